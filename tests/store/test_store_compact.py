"""compact(): fewer files, same values, crash-safe at every step."""

from __future__ import annotations

import numpy as np
import pytest

from emollama.store import FeatureStore
from store_helpers import FRAMES, TOKENS, UTT, stored, value

SPECS = (UTT, FRAMES)


def _many_small_commits(st, n_commits=12, per=3):
    keys = [st.ensure_set(s) for s in SPECS]
    clips = []
    for j in range(n_commits):
        with st.writer() as w:
            for i in range(per):
                c = f"c{j:02d}_{i}"
                clips.append(c)
                w.add(c, {s.key: value(c, s) for s in SPECS}, {"source": f"/v/{c}.mp4"})
    return keys, clips


def _files(path):
    return sum(1 for p in path.rglob("*") if p.is_file())


def _check(st, clips):
    for s in SPECS:
        assert st.complete(s.key) == set(clips)
        for c, x in zip(clips, st.read_many(clips, s.key)):
            np.testing.assert_array_equal(x, stored(c, s))
    rep = st.verify()
    assert rep.ok, rep.problems


def test_compact_drops_files_keeps_values(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    _, clips = _many_small_commits(st)
    with st.writer() as w:  # a duplicate and a failure
        w.add(clips[0], {UTT.key: np.zeros(1024, np.float32)})
        w.fail("broken", "decode error")
    st.remove([clips[1]], [UTT.key])
    with st.writer() as w:
        w.add(clips[1], {UTT.key: value(clips[1], UTT)})
    before = _files(tmp_path / "s")
    recs = st.records()
    r = st.compact()
    after = _files(tmp_path / "s")
    assert r["compacted"] == 15 and r["segments_after"] == 1
    assert after < before / 3 and r["files_after"] == after
    st2 = FeatureStore.open(tmp_path / "s", create=False)
    _check(st2, clips)
    assert st2.records() == recs and st2.failures() == {"broken": "decode error"}
    # one array per set now, holding each clip exactly once
    (mark,) = st2.commits.marks.values()
    assert sorted(mark["sets"][UTT.key]["clips"]) == sorted(clips)
    # nothing left to do; new small commits compact again without rewriting the big segment
    assert st2.compact()["compacted"] == 0
    with st2.writer() as w:
        w.add("late", {s.key: value("late", s) for s in SPECS})
    with st2.writer() as w:
        w.add("later", {s.key: value("later", s) for s in SPECS})
    assert st2.compact()["compacted"] == 2
    _check(FeatureStore.open(tmp_path / "s", create=False), clips + ["late", "later"])
    assert st2.compact(full=True)["segments_after"] == 1
    _check(FeatureStore.open(tmp_path / "s", create=False), clips + ["late", "later"])


def test_tombstone_survives_compaction_of_other_segments(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    _, clips = _many_small_commits(st, n_commits=4)
    st.compact()
    st.remove([clips[0]], [FRAMES.key])  # hides a row inside the big compacted segment
    with st.writer() as w:
        w.add("new", {s.key: value("new", s) for s in SPECS})
    r = st.compact(grace_s=0)
    assert r["compacted"] == 2  # the tombstone and the small segment; the big one is kept
    st2 = FeatureStore.open(tmp_path / "s", create=False)
    assert clips[0] not in st2.complete(FRAMES.key) and clips[0] in st2.complete(UTT.key)
    st2.compact(full=True, grace_s=0)
    st3 = FeatureStore.open(tmp_path / "s", create=False)
    assert clips[0] not in st3.complete(FRAMES.key) and "new" in st3.complete(FRAMES.key)


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["data-written", "mark-written", "marks-deleted"])
def test_compaction_killed_midway_leaves_store_consistent(tmp_path, step):
    st = FeatureStore.open(tmp_path / "s")
    _, clips = _many_small_commits(st, n_commits=6)
    recs = st.records()

    def crash(at):
        if at == step:
            raise Crash(at)

    st._maintenance.hook = crash
    with pytest.raises(Crash):
        st.compact()
    reader = FeatureStore.open(tmp_path / "s", create=False)
    _check(reader, clips)
    assert reader.records() == recs
    # a later compaction finishes the job
    r = reader.compact(grace_s=0)
    assert r["segments_after"] == 1
    final = FeatureStore.open(tmp_path / "s", create=False)
    _check(final, clips)
    assert final.verify().orphans == []
    n_data_dirs = sum(1 for s in SPECS for p in (tmp_path / "s" / "sets" / s.key).iterdir() if p.is_dir())
    assert n_data_dirs == len(SPECS)


def test_compact_large_segments_span_several_shards(tmp_path, monkeypatch):
    import emollama.store.segments as mod

    monkeypatch.setattr(mod, "SHARD_BYTES", 4 * 1025 * 48 * 2)  # 4 clips of TOKENS per shard
    st = FeatureStore.open(tmp_path / "s")
    k = st.ensure_set(TOKENS)
    clips = [f"t{i}" for i in range(11)]
    for part in (clips[:5], clips[5:]):
        with st.writer() as w:
            for c in part:
                w.add(c, {k: value(c, TOKENS)})
    st.compact()
    (seg,) = [p for p in (tmp_path / "s" / "sets" / k).iterdir() if p.is_dir()]
    assert len([p for p in (seg / "c").rglob("*") if p.is_file()]) == 3  # ceil(11 / 4) shard files
    for c, x in zip(clips, st.read_many(clips, k)):
        np.testing.assert_array_equal(x, stored(c, TOKENS))
    assert st.verify().ok


def test_crash_after_old_marks_deleted_really_happens_midway(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    _, clips = _many_small_commits(st, n_commits=3)
    steps = []

    def crash(at):
        steps.append(at)
        if at == "marks-deleted":
            raise Crash(at)

    st._maintenance.hook = crash
    with pytest.raises(Crash):
        st.compact()
    assert steps == ["data-written", "mark-written", "marks-deleted"]
    assert len(list((tmp_path / "s" / "_commits").glob("*.json"))) == 1  # old marks gone, old data not yet
    assert sum(1 for p in (tmp_path / "s" / "sets" / UTT.key).iterdir() if p.is_dir()) == 4
    _check(FeatureStore.open(tmp_path / "s", create=False), clips)


def test_compact_keeps_merged_segments_for_readers_opened_before(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    _, clips = _many_small_commits(st, n_commits=4)
    reader = FeatureStore.open(tmp_path / "s", create=False)   # e.g. a training run's view
    reader.complete(UTT.key)
    before = _files(tmp_path / "s")
    r = st.compact(keep_s=3600)
    assert r["compacted"] == 4 and r["segments_after"] == 1
    assert _files(tmp_path / "s") > before          # merged data kept beside the new segment
    for c, x in zip(clips, reader.read_many(clips, UTT.key)):   # the old view still reads
        np.testing.assert_array_equal(x, stored(c, UTT))
    _check(FeatureStore.open(tmp_path / "s", create=False), clips)
    r = st.compact(keep_s=0)                          # a later compaction past the delay deletes them
    assert _files(tmp_path / "s") < before and r["segments_after"] == 1
    _check(FeatureStore.open(tmp_path / "s", create=False), clips)

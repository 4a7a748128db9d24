"""Fault suite, the store itself: damaged commit marks (every command says so, `store repair` brings the
clips back), a full disk during compaction (one line, exit 4, nothing lost, no growth on retry), and a
`store compact` that reports what it really did."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli_store import store_app
from emollama.store import FeatureSpec, FeatureStore, StorageError, StoreFullError

UTT = FeatureSpec("audio.fault.utt", "audio", "hubert", "sha256:00", "last_hidden_state", "mean", (256,))
FRAMES = FeatureSpec("audio.fault.frames", "audio", "hubert", "sha256:00", "last_hidden_state", "none",
                     (None, 32), frame_rate=50.0)
SPECS = (UTT, FRAMES)
runner = CliRunner()


def value(clip: str, spec: FeatureSpec) -> np.ndarray:
    seed = zlib.crc32(f"{clip}|{spec.key}".encode())
    rng = np.random.default_rng(seed)
    shape = tuple(int(3 + seed % 9) if d is None else d for d in spec.shape)
    return rng.standard_normal(shape).astype(np.float32)


def fill(root: Path, n_commits: int = 4, per: int = 3) -> tuple[FeatureStore, list[str]]:
    st = FeatureStore.open(root)
    for s in SPECS:
        st.ensure_set(s)
    clips = []
    for j in range(n_commits):
        with st.writer() as w:
            for i in range(per):
                c = f"c{j}_{i}"
                clips.append(c)
                w.add(c, {s.key: value(c, s) for s in SPECS}, {"source": f"/v/{c}.mp4", "sha256": f"{j}{i}"})
    return st, clips


def snapshot(st: FeatureStore, clips: list[str]) -> dict:
    return {s.key: [x.copy() for x in st.read_many(clips, s.key)] for s in SPECS}


def assert_same(st: FeatureStore, clips: list[str], before: dict) -> None:
    for s in SPECS:
        assert st.complete(s.key) >= set(clips)
        for a, b in zip(st.read_many(clips, s.key), before[s.key]):
            np.testing.assert_array_equal(a, b)


def marks(root: Path) -> list[Path]:
    return sorted((root / "_commits").glob("*.json"))


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line (logging set up as users get it: warnings on stderr)."""
    return subprocess.run([sys.executable, "-m", "emollama.pipeline.cli", "store", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)


@pytest.mark.slow  # five runs of the real command line
def test_truncated_mark_every_command_says_so_and_repair_restores_it(tmp_path):
    root = tmp_path / "s"
    st, clips = fill(root)
    before, recs = snapshot(st, clips), st.records()
    hit = marks(root)[1]
    lost = json.loads(hit.read_bytes())["sets"][UTT.key]["clips"]
    truncated = hit.read_bytes()[:60]
    hit.write_bytes(truncated)  # a truncated mark: its 3 clips vanish

    out = {}
    for cmd in ("info", "ls", "verify"):
        res = out[cmd] = cli(cmd, str(root))
        warn = [ln for ln in res.stderr.splitlines() if hit.name in ln]
        assert len(warn) == 1 and "not valid JSON" in warn[0] and "emollama store repair" in warn[0], res.stderr
        assert "Traceback" not in res.stderr
        assert res.returncode == (1 if cmd == "verify" else 0), res.stdout + res.stderr
    assert "damaged  1 commit mark(s)" in out["info"].stdout
    assert "not valid JSON" in out["verify"].stdout and "emollama store repair" in out["verify"].stdout
    reader = FeatureStore.open(root, create=False)
    assert reader.complete(UTT.key) == set(clips) - set(lost)
    assert list(reader.damaged_marks) == [hit.stem]

    res = cli("repair", str(root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"commit mark {hit.stem}: restored from its copy" in res.stdout and "store OK" in res.stdout
    fixed = FeatureStore.open(root, create=False)
    assert_same(fixed, clips, before)
    assert fixed.records() == recs and fixed.damaged_marks == {}
    assert fixed.verify().ok
    assert (root / "_commits" / ".damaged" / hit.name).read_bytes() == truncated  # kept as it was
    res = cli("verify", str(root))
    assert res.returncode == 0 and res.stderr == "", res.stdout + res.stderr


@pytest.mark.parametrize("bad", [[1, 2], {"sets": {UTT.key: {"clips": 5}}}, {"sets": []},
                                 {"sets": {UTT.key: {"clips": ["a"], "offsets": [0]}}}, "text", None])
def test_wrong_shape_mark_no_traceback_and_rebuilt_from_segment_data(tmp_path, bad, caplog):
    root = tmp_path / "s"
    st, clips = fill(root)
    before = snapshot(st, clips)
    hit = marks(root)[2]
    hit.write_text(json.dumps(bad))
    (root / "_commits" / ".copies" / hit.name).unlink()  # no copy (as in a store written before copies)

    with caplog.at_level(logging.WARNING, logger="emollama.store.store"):
        reader = FeatureStore.open(root, create=False)
    assert [r.getMessage() for r in caplog.records if hit.name in r.getMessage()], caplog.text
    assert len(reader.complete(UTT.key)) == len(clips) - 3
    for cmd in (["info", str(root)], ["ls", str(root)], ["verify", str(root)], ["info", "--json", str(root)]):
        res = runner.invoke(store_app, cmd)
        assert res.exception is None or isinstance(res.exception, SystemExit), res.output
        assert res.exit_code == (1 if cmd[0] == "verify" else 0), res.output
    assert hit.stem in json.loads(runner.invoke(store_app, ["info", "--json", str(root)]).stdout)["damaged_marks"]

    res = runner.invoke(store_app, ["repair", str(root)])
    assert res.exit_code == 0, res.output
    assert "rebuilt from its segment data (3 clip(s) in 2 set(s))" in res.output
    fixed = FeatureStore.open(root, create=False)
    assert_same(fixed, clips, before)
    assert fixed.verify().ok and fixed.damaged_marks == {}
    # the store goes on as usual: a compaction merges the rebuilt segment too
    fixed.compact()
    assert_same(FeatureStore.open(root, create=False), clips, before)


def test_damaged_compacted_mark_recovers_the_whole_store(tmp_path, caplog):
    """After a compaction one mark holds every clip: damaging it hid the whole store."""
    root = tmp_path / "s"
    st, clips = fill(root, n_commits=5)
    with st.writer() as w:
        w.fail("broken", "decode error")
    st.compact()
    before = snapshot(st, clips)
    (hit,) = marks(root)
    hit.write_bytes(hit.read_bytes()[: len(hit.read_bytes()) // 2])
    (root / "_commits" / ".copies" / hit.name).write_bytes(b"")  # the copy is damaged too
    with caplog.at_level(logging.WARNING, logger="emollama.store.store"):
        reader = FeatureStore.open(root, create=False)
    assert reader.clips() == set() and "emollama store repair" in caplog.text
    r = reader.repair()
    assert r["ok"] and r["recovered_clips"] == len(clips) and r["recompute"] == [], r
    fixed = FeatureStore.open(root, create=False)
    assert_same(fixed, clips, before)
    assert fixed.verify().ok
    # a rerun retries what the store no longer knows about (the failure record was only in that mark)
    assert "broken" not in fixed.clips()


def test_damaged_mark_over_lost_data_marks_clips_for_recompute_and_deletes_nothing(tmp_path):
    root = tmp_path / "s"
    st, clips = fill(root)
    before = snapshot(st, clips)
    hit = marks(root)[0]
    seg = hit.stem
    lost = json.loads(hit.read_bytes())["sets"][FRAMES.key]["clips"]
    hit.write_bytes(b"{")
    (root / "_commits" / ".copies" / hit.name).unlink()
    shard = next((root / "sets" / FRAMES.key / seg / "c").rglob("*"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    shard.unlink()  # FRAMES data of that segment is gone; UTT data is intact
    files_before = {p for p in root.rglob("*") if p.is_file()}

    r = FeatureStore.open(root, create=False).repair()
    assert r["ok"], r
    assert sorted(r["recompute"]) == sorted(lost)
    assert r["unrecovered"] == [f"sets/{FRAMES.key}/{seg}"]
    fixed = FeatureStore.open(root, create=False)
    keep = [c for c in clips if c not in lost]
    assert fixed.complete(UTT.key) == set(clips)            # UTT rows of the damaged segment are back
    assert fixed.complete(FRAMES.key) == set(keep)
    for c in lost:                                          # marked for recompute: a rerun retries failed clips
        rec = fixed.records()[c]
        assert rec["status"] == "failed" and "store repair" in rec["reason"] and FRAMES.key in rec["reason"]
    assert set(fixed.failures()) == set(lost)
    np.testing.assert_array_equal(fixed.read(lost[0], [UTT.key])[UTT.key], before[UTT.key][clips.index(lost[0])])
    assert fixed.verify().ok
    assert files_before <= {p for p in root.rglob("*") if p.is_file()}  # nothing deleted
    fixed.compact(grace_s=0)   # compaction keeps what repair could not read
    assert (root / "sets" / FRAMES.key / seg / "zarr.json").is_file()
    assert FeatureStore.open(root, create=False).verify().ok


def test_compact_reports_what_it_removed(tmp_path, monkeypatch):
    """`store compact` printed "compacted 0 segments" while it deleted the segments an earlier
    compaction (extraction's, with --keep) had kept."""
    root = tmp_path / "s"
    st, clips = fill(root, n_commits=6)
    st.compact(keep_s=3600)  # as extraction does: merged segments kept for readers for an hour
    n_before = sum(1 for p in root.rglob("*") if p.is_file())
    bytes_before = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    import emollama.store.maintenance as mod

    monkeypatch.setattr(mod, "segment_age_s", lambda seg: 1e9)  # an hour later
    res = runner.invoke(store_app, ["compact", str(root), "--keep", "3600"])
    assert res.exit_code == 0, res.output
    n_after = sum(1 for p in root.rglob("*") if p.is_file())
    assert n_after < n_before
    line = res.output.strip()
    assert "nothing to merge" in line and "deleted 6 merged segment(s)" in line
    assert f"files {n_before} -> {n_after} ({n_before - n_after} removed, 0 written)" in line
    freed = bytes_before - sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert freed > 0 and f"{freed / 1e6:.1f} MB freed" in line
    assert_same(FeatureStore.open(root, create=False), clips, snapshot(st, clips))


# ---------------------------------------------------------------------------- a full disk (tmpfs)
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def used(mnt: Path) -> int:
    return shutil.disk_usage(mnt).used


def fill_up(mnt: Path, leave: int) -> None:
    (mnt / "filler").unlink(missing_ok=True)
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_full_disk_during_compaction(small_disk):
    root = small_disk / "s"
    st, clips = fill(root, n_commits=8, per=6)
    before, recs = snapshot(st, clips), st.records()
    fill_up(small_disk, leave=8 * 1024)  # the merge needs about 100 KB
    files0 = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    res = runner.invoke(store_app, ["compact", str(root)])
    assert res.exit_code == 4, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full while compacting"), res.output
    assert "nothing committed was lost" in lines[0] and "free space" in lines[0]
    assert "Traceback" not in res.output
    after_first = used(small_disk)
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == files0  # no orphans
    reader = FeatureStore.open(root, create=False)
    assert_same(reader, clips, before)
    assert reader.records() == recs and reader.verify().ok

    # a retry leaves no orphan: the same files and folders; the bytes used may move by a page or two of
    # tmpfs bookkeeping (seen once under load), never by the ~100 KB a kept partial merge would hold
    entries0 = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(StoreFullError, match="disk full"):   # the API raises the one-line error too
        reader.compact()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == entries0
    assert used(small_disk) <= after_first + 16 * 1024
    res = runner.invoke(store_app, ["compact", str(root)])
    assert res.exit_code == 4 and used(small_disk) <= after_first + 16 * 1024
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == entries0

    (small_disk / "filler").unlink()                          # space freed: the same command finishes
    res = runner.invoke(store_app, ["compact", str(root)])
    assert res.exit_code == 0, res.output
    assert "merged 8 segments into 1" in res.output
    final = FeatureStore.open(root, create=False)
    assert_same(final, clips, before)
    assert final.records() == recs and final.verify().ok


def test_full_disk_during_a_commit_leaves_nothing_behind(small_disk):
    root = small_disk / "s"
    st, clips = fill(root, n_commits=2)
    before = snapshot(st, clips)
    fill_up(small_disk, leave=16 * 1024)
    files0 = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    big = [f"n{i}" for i in range(40)]
    with pytest.raises(StorageError) as ei:
        with st.writer() as w:
            for c in big:
                w.add(c, {s.key: value(c, s) for s in SPECS})
    assert isinstance(ei.value, StoreFullError) and "\n" not in str(ei.value)
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == files0
    reader = FeatureStore.open(root, create=False)
    assert reader.complete(UTT.key) == set(clips) and reader.verify().ok
    assert_same(reader, clips, before)
    fill_up(small_disk, leave=0)
    with pytest.raises(StoreFullError):
        reader.check_writable()
    (small_disk / "filler").unlink()
    reader.check_writable()
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == files0


def test_storage_error_is_one_line_and_keeps_errno_across_processes():
    import errno
    import pickle

    e = pickle.loads(pickle.dumps(StoreFullError("disk full while compacting in /s: ...", errno.ENOSPC)))
    assert isinstance(e, StorageError) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e) == "disk full while compacting in /s: ..."


def test_replace_supersedes_earlier_copies_in_the_same_commit(tmp_path):
    """What a rerun of a changed file needs: the earlier features stay until the new ones are committed."""
    root = tmp_path / "s"
    st, clips = fill(root, n_commits=3)
    st.compact()                       # the earlier copy sits in a compacted segment
    c = clips[4]
    new = {s.key: value(c, s)[::-1].copy() for s in SPECS}
    with pytest.raises(RuntimeError):
        with st.writer() as w:         # a replacement that never commits: the earlier copy stays
            w.add(c, new, replace=True)
            raise RuntimeError("interrupted")
    assert c in st.complete(UTT.key)
    np.testing.assert_array_equal(st.read(c, [UTT.key])[UTT.key], value(c, UTT).astype(UTT.dtype))
    with st.writer() as w:
        w.add(c, new, {"sha256": "changed"}, replace=True)
    for reader in (st, FeatureStore.open(root, create=False)):
        for s in SPECS:
            np.testing.assert_array_equal(reader.read(c, [s.key])[s.key], new[s.key].astype(s.dtype))
        assert reader.records()[c]["sha256"] == "changed" and reader.verify().ok
    for full in (False, True):         # after merging the new segment alone, then every segment into one
        st.compact(full=full, grace_s=0)
        final = FeatureStore.open(root, create=False)
        for s in SPECS:
            np.testing.assert_array_equal(final.read(c, [s.key])[s.key], new[s.key].astype(s.dtype))
        assert final.complete(UTT.key) == set(clips) and final.verify().ok

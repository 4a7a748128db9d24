"""Fault suite, extraction (issue 11): reruns never lose features, streamed containers get their real
length, subfolder ids work, previews never fail clips, an unwritable store stops the run before any
work, Ctrl-C under dask is one line, and unusable entries are listed. docs/faults.md tabulates them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.extract import decode
from emollama.extract.step import ClipJob, ExtractSettings, prepare
from emollama.pipeline.cli import app
from emollama.store import FeatureStore
from emollama.corpora import id_to_path, load_folder

runner = CliRunner()
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(Path(__file__).parent))
from test_fault_inputs import write_clip  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers


def extract(data: Path, store: Path, *extra: str):
    """The CLI in this process (tiny profile, no dask); returns (exit code, JSON summary or None, output)."""
    r = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(data), "--store", str(store),
                            "--profile", "tiny", "--workers", "0", "--no-progress", "--json", *extra])
    out = None
    if r.stdout and "{" in r.stdout:
        out = json.loads(r.stdout[r.stdout.index("{"):])
    return r.exit_code, out, r.output


def features(store: Path, cid: str) -> dict[str, np.ndarray]:
    st = FeatureStore.open(store, create=False)
    return st.read(cid, list(st.sets()))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


class _Pipe(io.RawIOBase):
    """A non-seekable output: the muxer cannot go back to write a duration or a frame count."""

    def __init__(self, f):
        self.f = f

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self.f.write(b)
        return len(b)


def write_streamed(path: Path, fmt: str, frames: int = 50, fps: int = 25) -> Path:
    """Matroska / WebM written through a pipe, as ffmpeg | file, a browser or a live recorder does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    webm = fmt == "webm"
    with open(path, "wb") as f, av.open(_Pipe(f), "w", format=fmt) as out:
        vs = out.add_stream("libvpx" if webm else "libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 96, 72, "yuv420p"
        aus = out.add_stream("libopus" if webm else "aac", rate=48000 if webm else 16000, layout="mono")
        for i in range(frames):
            img = np.full((72, 96, 3), 110, np.uint8)
            img[24:40, (i * 3) % 80:(i * 3) % 80 + 16] = 230
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        sr, size = aus.rate, (960 if webm else 1024)
        n = int(frames / fps * sr)
        tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(n + size) / sr)).astype(np.float32)
        for s in range(0, n, size):
            af = av.AudioFrame.from_ndarray(tone[None, s:s + size].copy(), format="flt" if webm else "fltp",
                                            layout="mono")
            af.sample_rate, af.pts, af.time_base = sr, s, Fraction(1, sr)
            for pkt in aus.encode(af):
                out.mux(pkt)
        for pkt in aus.encode():
            out.mux(pkt)
    return path


def _mount_tmpfs(folder: Path, size: str = "2m") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({(r.stderr or r.stdout).strip()})")


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# ------------------------------------------------------------------------ defect 1: reruns lose nothing


def test_a_touched_file_is_not_recomputed_and_a_failed_recompute_keeps_the_old_features(tmp_path, monkeypatch):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    write_clip(data / "a.mp4")
    write_clip(data / "b.mp4", frames=30)
    code, out, _ = extract(data, store)
    assert code == 0 and sorted(out["ok"]) == ["a", "b"]
    old = features(store, "a")
    old_rec = FeatureStore.open(store).records()["a"]

    # touch (a copy without -t, an unzip): size and content unchanged, mtime new -> nothing recomputed
    later = time.time() + 100
    os.utime(data / "a.mp4", (later, later))
    marks = sorted(os.listdir(store / "_commits"))
    import emollama.extract.step as step

    def no_encoding(*a, **k):
        raise AssertionError("an encoder ran for a clip whose content did not change")

    monkeypatch.setattr(step, "encode", no_encoding)
    code, out, _ = extract(data, store)
    assert code == 0, out
    assert out["ok"] == [] and out["skipped"] == 2 and out["unchanged"] == ["a"] and out["recomputed"] == []
    assert sorted(os.listdir(store / "_commits")) == marks          # not one byte written
    assert same(features(store, "a"), old)

    # real new content, and the recompute fails (the encoder raises): the old features stay readable
    write_clip(data / "a.mp4", frames=40, size=(80, 64))
    monkeypatch.setattr(step, "encode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("GPU fell off")))
    code, out, _ = extract(data, store)
    assert code == 1
    assert out["recomputed"] == ["a"] and out["kept"] == ["a"]
    assert "GPU fell off" in dict(out["failed"])["a"] and "earlier version" in dict(out["failed"])["a"]
    st = FeatureStore.open(store)
    assert st.verify().ok
    assert same(features(store, "a"), old)
    assert st.records()["a"]["status"] == "ok" and st.records()["a"]["sha256"] == old_rec["sha256"]

    # the next rerun recomputes it (the change is still seen) and the new rows replace the old ones
    monkeypatch.undo()
    code, out, _ = extract(data, store)
    assert code == 0 and out["ok"] == ["a"] and out["recomputed"] == ["a"] and out["kept"] == []
    st = FeatureStore.open(store)
    assert st.verify().ok
    new = features(store, "a")
    assert not same(new, old)
    assert st.records()["a"]["frames"] == 40 and st.records()["a"]["sha256"] != old_rec["sha256"]
    code, out, _ = extract(data, store)                              # and then it is complete
    assert code == 0 and out["ok"] == [] and out["skipped"] == 2


def test_a_rerun_killed_mid_recompute_loses_nothing(tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    write_clip(data / "a.mp4")
    code, out, _ = extract(data, store)
    assert code == 0
    old = features(store, "a")
    write_clip(data / "a.mp4", frames=40, size=(80, 64))             # new content: selected for recompute
    # the process dies (SIGKILL, no cleanup) the moment the clip's features are being computed
    killer = ("import os, signal, sys, emollama.extract.step as s\n"
              "s.encode = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from emollama.pipeline.cli import app\n"
              "sys.argv[0] = 'emollama'\n"
              "app()\n")
    r = subprocess.run([sys.executable, "-c", killer, "extract", "--dataset", "folder", "--data", str(data),
                        "--store", str(store), "--profile", "tiny", "--workers", "0", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    st = FeatureStore.open(store)
    assert st.verify().ok
    assert same(features(store, "a"), old)                          # still there, still readable
    assert st.records()["a"]["status"] == "ok"


# ---------------------------------------------------------------- defect 2: containers without duration


def test_streamed_mkv_and_webm_get_their_real_frame_count(tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    mkv = write_streamed(data / "piped.mkv", "matroska")
    webm = write_streamed(data / "browser.webm", "webm")
    for p in (mkv, webm):                                            # the fault: the header says nothing
        with av.open(str(p)) as c:
            assert c.duration is None and c.streams.video[0].frames == 0
        info = decode.probe(p)
        assert (info.n_frames, info.frames_from) == (50, "packets") and abs(info.duration - 2.0) < 0.05
    raw = mkv.read_bytes()
    (data / "recording.mkv").write_bytes(raw[: len(raw) * 6 // 10])  # a recording still being written
    code, out, _ = extract(data, store)
    assert code == 1
    assert sorted(out["ok"]) == ["browser", "piped"]
    st = FeatureStore.open(store)
    for cid in ("piped", "browser"):
        rec = st.records()[cid]
        assert rec["frames"] == 50 and abs(rec["duration"] - 2.0) < 0.05 and rec["frames_from"].startswith("packets")
        assert rec["global_index"] > 0                               # frames were sampled across the clip
    why = dict(out["failed"])["recording"]
    assert "incomplete file" in why and "still being written" in why
    assert st.records()["recording"]["status"] == "failed"
    assert not any("recording" in st.complete(k) for k in st.sets())


def test_a_file_that_grows_while_it_is_read_is_not_stored_as_complete(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "growing.mp4")
    real = decode.read_audio

    def read_audio_while_a_writer_appends(path, **kw):
        with open(path, "ab") as f:
            f.write(b"\0" * 4096)
        return real(path, **kw)

    monkeypatch.setattr(decode, "read_audio", read_audio_while_a_writer_appends)
    prep = prepare(ClipJob("growing", str(clip)), ExtractSettings(encoders=None), detector=None)
    assert prep.error and "changed while it was read" in prep.error


def test_the_frame_size_limit_fails_a_clip_with_its_reason(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", size=(96, 72))
    prep = prepare(ClipJob("c", str(clip)), ExtractSettings(encoders=None, max_pixels=96 * 72 - 1), detector=None)
    assert prep.error == "frame size 96x72 (6,912 pixels) exceeds the limit of 6,911 pixels (extract.max_pixels)"
    assert decode.probe(clip, max_pixels=96 * 72).n_frames == 25    # at the limit: fine
    assert decode.DEFAULT_MAX_PIXELS == 8192 * 8192 and ExtractSettings(encoders=None).max_pixels == 8192 * 8192
    # the same limit from the command line: the clip fails with its reason, the run goes on
    data = tmp_path / "data"
    data.mkdir()
    clip.rename(data / "c.mp4")
    code, out, _ = extract(data, tmp_path / "s.zarr", "--max-pixels", str(96 * 72 - 1))
    assert code == 1 and out["failed"][0][0] == "c" and "frame size 96x72 (6,912 pixels) exceeds" in out["failed"][0][1]


# ------------------------------------------------------------------------- defect 3: subfolder ids


def test_subfolder_ids_are_committed_unique_and_readable(tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    write_clip(data / "a" / "x.mp4")
    write_clip(data / "b" / "x.mp4", frames=30, size=(80, 64))
    write_clip(data / "x.mp4", frames=20)
    code, out, _ = extract(data, store)
    assert code == 0 and out["failed"] == []
    assert sorted(out["ok"]) == ["a%2Fx", "b%2Fx", "x"]
    st = FeatureStore.open(store)
    assert st.verify().ok
    assert [id_to_path(c) for c in sorted(st.complete(next(iter(st.sets()))))] == ["a/x", "b/x", "x"]
    fa, fb = features(store, "a%2Fx"), features(store, "b%2Fx")
    assert not same(fa, fb)                                          # two clips, not one overwritten
    assert st.records()["b%2Fx"]["source"].endswith("b/x.mp4") and st.records()["b%2Fx"]["frames"] == 30
    code, out, _ = extract(data, store)                              # a rerun: all complete, none failing
    assert code == 0 and out["skipped"] == 3 and out["failed"] == []


# ------------------------------------------------------------------------- defect 6: previews


def test_a_bad_preview_name_fails_nothing_and_names_never_collide(tmp_path):
    data, store, prev = tmp_path / "data", tmp_path / "s.zarr", tmp_path / "preview"
    for name in ("..mp4", "a b.mp4", "a_b.mp4"):
        write_clip(data / name)
    code, out, _ = extract(data, store, "--preview", str(prev))
    assert code == 0 and sorted(out["ok"]) == [".", "a b", "a_b"] and out["preview_failed"] == []
    sheets = sorted(p.name for p in prev.iterdir())
    assert len(sheets) == 3 and all(s.endswith(".png") and not s.startswith(".") for s in sheets)
    assert sum(s.startswith("a_b-") for s in sheets) == 2            # "a b" and "a_b": two files
    # a preview folder that cannot be written: every clip still ok, each missing sheet listed
    blocked = tmp_path / "not a folder"
    blocked.write_text("x")
    store2 = tmp_path / "s2.zarr"
    code, out, text = extract(data, store2, "--preview", str(blocked))
    assert code == 0 and sorted(out["ok"]) == [".", "a b", "a_b"] and out["failed"] == []
    assert sorted(c for c, _ in out["preview_failed"]) == [".", "a b", "a_b"]
    assert FeatureStore.open(store2).verify().ok


# ------------------------------------------------------------------- defect 7: an unwritable store


def test_a_read_only_store_stops_the_run_before_any_work(tmp_path, monkeypatch):
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    write_clip(data / "a.mp4")
    _mount_tmpfs(mnt)
    try:
        FeatureStore.open(mnt / "s.zarr")                             # an existing, empty store
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = files_of(mnt)
        import emollama.pipeline.extraction as extraction

        def no_models(*a, **k):
            raise AssertionError("models were loaded for a store that cannot be written")

        monkeypatch.setattr(extraction, "describe_encoders", no_models)
        code, out, text = extract(data, mnt / "s.zarr")
        assert code == 4, text
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert "not writable" in lines[0] and "Read-only file system" in lines[0]
        assert "nothing committed was lost" in lines[0] and "rerun" in lines[0]
        assert files_of(mnt) == before
        code, out, text = extract(data, mnt / "new.zarr")             # a new store on it: same answer
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert code == 4 and len(lines) == 1 and "cannot be created (Read-only file system)" in lines[0]
    finally:
        _umount(mnt)


def test_a_full_disk_is_one_clear_error_loses_nothing_and_never_grows(tmp_path):
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    write_clip(data / "a.mp4")
    _mount_tmpfs(mnt, "2m")
    try:
        store = mnt / "s.zarr"
        code, out, text = extract(data, store)
        assert code == 0, text
        old = features(store, "a")
        with open(mnt / "filler", "wb") as f:                         # fill the disk
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        (mnt / "filler").stat()
        write_clip(data / "b.mp4", frames=30)
        sizes = None
        for attempt in range(3):                                      # retries leave nothing behind
            code, out, text = extract(data, store)
            assert code == 4, text
            lines = [ln for ln in text.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: disk full"), text
            assert "nothing committed was lost" in lines[0] and "free space" in lines[0]
            now = files_of(mnt)
            assert sizes is None or now == sizes
            sizes = now
        assert same(features(store, "a"), old)
        assert FeatureStore.open(store).verify().ok
    finally:
        _umount(mnt)


# ----------------------------------------------------------------- defect 8: Ctrl-C, unusable entries


def test_ctrl_c_under_dask_is_one_line_and_exit_130(tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    for i in range(10):
        write_clip(data / f"c{i}.mp4", frames=50)
    p = subprocess.Popen([sys.executable, "-m", "emollama.pipeline.cli", "extract", "--dataset", "folder", "--data",
                          str(data), "--store", str(store), "--profile", "tiny", "--workers", "1",
                          "--batch-clips", "2", "--no-progress"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        t0 = time.time()
        while not (store / "_commits").is_dir() or not os.listdir(store / "_commits"):  # mid-run
            assert p.poll() is None, p.communicate()
            assert time.time() - t0 < 240, "no commit within 240 s"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)        # what a terminal does: every process of the group
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["interrupted: rerun to resume"], err[-3000:]
    for _ in range(60):                        # no worker left behind (a zombie is reaped within seconds)
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("a process of the interrupted run is still alive 30 s later")
    st = FeatureStore.open(store)
    assert st.verify().ok
    r = subprocess.run([sys.executable, "-m", "emollama.pipeline.cli", "extract", "--dataset", "folder", "--data",
                        str(data), "--store", str(store), "--profile", "tiny", "--workers", "0", "--no-progress",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    done = json.loads(r.stdout[r.stdout.index("{"):])
    assert r.returncode == 0 and done["skipped"] >= 1 and done["skipped"] + len(done["ok"]) == 10


def test_fifos_directories_and_broken_links_are_listed_not_dropped(tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    write_clip(data / "good.mp4")
    os.mkfifo(data / "pipe.mp4")
    (data / "folder.mp4").mkdir()
    (data / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    code, out, text = extract(data, store)
    assert code == 0 and out["ok"] == ["good"]
    rejected = dict(out["rejected"])
    assert "FIFO" in rejected["pipe"]
    assert "directory" in rejected["folder"]
    assert "broken symbolic link" in rejected["gone"] and "nowhere.mp4" in rejected["gone"]
    assert len(rejected) == 3
    corpus = load_folder(data)
    assert [c.id for c in corpus.clips] == ["good"] and len(corpus.rejected) == 3


def test_a_full_disk_in_the_end_of_run_compaction_keeps_the_summary(tmp_path, monkeypatch):
    """Every clip is committed before the compaction: its failure must not lose the summary."""
    import errno as _errno

    from emollama.store import StoreFullError

    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "a.mp4")
    write_clip(data / "b.mp4", frames=30)

    def full(self, *a, **k):
        raise StoreFullError("disk full while compacting in S: nothing committed was lost", _errno.ENOSPC)

    monkeypatch.setattr(FeatureStore, "compact", full)
    r = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(data), "--store", str(tmp_path / "s.zarr"),
                            "--profile", "tiny", "--workers", "0", "--no-progress"])
    assert r.exit_code == 4
    assert "clips: 2 in corpus, 0 already complete, 2 extracted, 0 failed" in r.stdout
    assert r.stderr.strip().splitlines() == [
        "error: every clip is committed, but the end-of-run compaction failed: disk full while compacting in S: "
        "nothing committed was lost"]
    st = FeatureStore.open(str(tmp_path / "s.zarr"), create=False)
    assert all(st.complete(k) == {"a", "b"} for k in st.sets())


def test_a_silent_clip_follows_its_datasets_sound_declaration(tmp_path):
    """Whether a clip must have sound is the dataset's declaration (corpora), not a guess from the path."""
    from emollama.corpora import Clip, clip_has_sound, load_corpus
    from emollama.extract.faces import FaceDetector

    clip = write_clip(tmp_path / "mute.mp4", audio_s=None)
    settings, det = ExtractSettings(encoders=None), FaceDetector()
    declared_silent = prepare(ClipJob("mute", str(clip), has_sound=False), settings, detector=det)
    assert declared_silent.error is None and declared_silent.record["audio"] == "silence: the clip has no audio"
    expected_sound = prepare(ClipJob("mute", str(clip), has_sound=True), settings, detector=det)
    assert expected_sound.error and "no audio stream" in expected_sound.error
    assert prepare(ClipJob("mute", str(clip)), settings, detector=det).error == expected_sound.error  # a file
    # the adapters declare it: a folder of videos has sound, a DFEW frame folder has none
    (tmp_path / "data").mkdir()
    clip.rename(tmp_path / "data" / "mute.mp4")
    assert [clip_has_sound(c) for c in load_corpus("folder", tmp_path / "data").clips] == [True]
    assert clip_has_sound(Clip("f", tmp_path)) is False   # outside an adapter: a folder source has none

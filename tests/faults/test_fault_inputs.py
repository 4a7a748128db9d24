"""Fault suite, inputs: messy clips never abort a run, never leave partial entries, and each one
ends as a clear error, a recorded failure with its reason, or a clean success.

One folder of bad and odd clips is extracted once (tiny profile, in process); each test then
checks one fault's outcome in the summary and in the store. docs/faults.md tabulates them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.store import FeatureStore

runner = CliRunner()
pytestmark = pytest.mark.slow


def write_clip(path: Path, *, frames: int = 25, size=(96, 72), fps=25, audio_s: float | None = 1.0,
               video: bool = True, rotate: int | None = None, vfr: bool = False, codec: str = "libx264") -> Path:
    """A small real clip: a moving bright square on grey, with a tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), "w") as out:
        vs = None
        if video:
            vs = out.add_stream(codec, rate=fps, options={"preset": "ultrafast"})
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            if vfr:
                vs.codec_context.time_base = Fraction(1, 1000)
            if rotate is not None:
                vs.set_display_rotation(rotate)
        aus = out.add_stream("aac", rate=16000, layout="mono") if audio_s else None
        if vs is not None:
            t = 0
            for i in range(frames):
                img = np.full((h, w, 3), 110, np.uint8)
                x = (i * 3) % max(1, w - 16)
                img[h // 3:h // 3 + 16, x:x + 16] = 230
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                if vfr:
                    frame.pts, frame.time_base = t, Fraction(1, 1000)
                    t += 20 if i % 2 else 60
                for pkt in vs.encode(frame):
                    out.mux(pkt)
            for pkt in vs.encode():
                out.mux(pkt)
        if aus is not None:
            n = int(audio_s * 16000)
            tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(n) / 16000)).astype(np.float32)
            for start in range(0, n, 1024):
                chunk = tone[start:start + 1024][None, :]
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 16000, start, Fraction(1, 16000)
                for pkt in aus.encode(af):
                    out.mux(pkt)
            for pkt in aus.encode():
                out.mux(pkt)
    return path


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    good = write_clip(data / "good.mp4")
    raw = good.read_bytes()
    (data / "truncated.mp4").write_bytes(raw[: len(raw) // 3])
    (data / "random bytes.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (data / "zero.mp4").write_bytes(b"")
    write_clip(data / "audio only.mp4", video=False)
    write_clip(data / "no audio.mp4", audio_s=None)
    write_clip(data / "single frame.mp4", frames=1)
    write_clip(data / "uhd 4k.mp4", frames=3, size=(3840, 2160))
    write_clip(data / "phone rotated.mp4", frames=10, size=(96, 64), rotate=90)
    write_clip(data / "variable rate.mp4", frames=30, vfr=True)
    write_clip(data / "naïve café – take 2.mp4")
    write_clip(data / "dup.mp4")
    write_clip(data / "dup.mkv")
    store = root / "store.zarr"
    result = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(data), "--store", str(store),
                                 "--profile", "tiny", "--workers", "0", "--no-progress", "--json"])
    out = json.loads(result.output[result.output.index("{"):])
    return {"exit": result.exit_code, "out": out, "store": FeatureStore.open(store), "data": data,
            "failed": dict(out["failed"]), "rejected": dict(out["rejected"])}


def _complete_everywhere(st: FeatureStore, cid: str) -> bool:
    return all(cid in st.complete(k) for k in st.sets())


def _absent_everywhere(st: FeatureStore, cid: str) -> bool:
    return not any(cid in st.complete(k) for k in st.sets())


def test_the_run_goes_on_and_the_exit_status_says_so(faults):
    assert faults["exit"] == 1                       # some clips failed
    assert "good" in faults["out"]["ok"]
    assert faults["store"].verify().ok               # nothing partial anywhere


@pytest.mark.parametrize("cid, reason", [
    ("truncated", "cannot open"),
    ("random bytes", "cannot open"),
    ("zero", "zero length"),
    ("audio only", "no video stream"),
    ("no audio", "no audio stream"),
])
def test_broken_inputs_are_recorded_with_their_reason(faults, cid, reason):
    assert reason in faults["failed"][cid]
    st = faults["store"]
    assert reason in st.failures()[cid] and st.records()[cid]["status"] == "failed"
    assert _absent_everywhere(st, cid)


@pytest.mark.parametrize("cid", ["single frame", "uhd 4k", "phone rotated", "variable rate",
                                 "naïve café – take 2"])
def test_odd_but_valid_inputs_are_extracted(faults, cid):
    st = faults["store"]
    assert cid in faults["out"]["ok"] and _complete_everywhere(st, cid)
    rec = st.records()[cid]
    if cid == "uhd 4k":
        assert (rec["width"], rec["height"]) == (3840, 2160)
    if cid == "phone rotated":
        assert rec["rotation"] in (90, 270) and (rec["width"], rec["height"]) == (64, 96)


def test_duplicate_ids_are_rejected_not_mixed(faults):
    assert "duplicate id" in faults["rejected"]["dup"]
    assert faults["out"]["ok"].count("dup") == 1


def test_ids_that_escape_the_data_folder_and_unknown_labels_are_rejected(tmp_path):
    from emollama.corpora import load_merr

    (tmp_path / "video").mkdir()
    write_clip(tmp_path / "video" / "ok.mp4")
    (tmp_path / "MERR_coarse_grained.txt").write_text(
        "ok 25 happy 0.1\n../secret 25 happy 0.1\n/etc/passwd 25 sad 0\nok2 25 bored 0\n")
    corpus = load_merr(tmp_path)   # and no transcript CSV at all: subtitles are simply absent
    assert [c.id for c in corpus.clips] == ["ok"] and corpus.clips[0].subtitle is None
    reasons = dict(corpus.rejected)
    assert "leaves the data folder" in reasons["../secret"]
    assert "absolute path" in reasons["/etc/passwd"]
    assert "not in the label set" in reasons["ok2"]


def test_an_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(tmp_path / "empty"), "--store",
                                 str(tmp_path / "s.zarr"), "--profile", "tiny", "--workers", "0"])
    assert result.exit_code == 2 and "no clips" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_frame_folder_with_unreadable_jpegs(tmp_path):
    from emollama.extract import decode

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(folder / f"{i:03d}.jpg")
    (folder / "003.jpg").write_bytes(b"not a jpeg")
    frames = decode.read_frames(folder, [2, 3, 4])       # frame 3 borrows its nearest readable neighbour
    assert frames.shape == (3, 32, 32, 3) and abs(int(frames[1].mean()) - 40) <= 2
    for p in folder.iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(decode.DecodeError, match="no readable frame"):
        decode.read_frames(folder, [0])


def test_a_ten_minute_clip_is_streamed_with_bounded_memory(tmp_path):
    """Ten minutes at 5 fps with sound: extraction's peak memory stays close to a 2 s clip's."""
    long_dir, short_dir = tmp_path / "long", tmp_path / "short"
    write_clip(long_dir / "long.mp4", frames=600 * 5, fps=5, size=(64, 48), audio_s=600)
    write_clip(short_dir / "short.mp4", frames=10, fps=5, size=(64, 48), audio_s=2)
    code = ("import json, resource, sys\n"
            "from emollama.pipeline.cli import app\n"
            "try:\n"
            "    app(sys.argv[1:])\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    rss = {}
    for name, d in (("short", short_dir), ("long", long_dir)):
        proc = subprocess.run([sys.executable, "-c", code, "extract", "--dataset", "folder", "--data", str(d),
                               "--store", str(tmp_path / f"{name}.zarr"), "--profile", "tiny", "--workers", "0",
                               "--no-progress"], capture_output=True, text=True, env={**os.environ}, timeout=300)
        assert "1 extracted, 0 failed" in proc.stdout, proc.stdout + proc.stderr
        rss[name] = int(proc.stdout.split("RSS")[-1]) / 1024   # MB
    assert rss["long"] - rss["short"] < 400, rss
    st = FeatureStore.open(tmp_path / "long.zarr")
    key = next(k for k, s in st.sets().items() if s.name == "audio.hubert.frames")
    assert abs(st.read("long", [key])[key].shape[0] - 600 * 50) < 60       # 50 frames a second

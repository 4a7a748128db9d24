"""`emollama timeline` with the tiny profile: a video joined from three real sample clips gets windows
inside each part and its cuts marked at the joins; a rerun extracts nothing; the window plan is exact;
streamed decoding keeps memory bounded whatever the length."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from emollama.extract import decode
from emollama.extract.windows import MIN_SHOT_S, plan_windows, scan_cuts, write_windows
from emollama.pipeline.cli import app

runner = CliRunner()


def join_clips(paths, out: Path, size=(480, 270), fps: int = 25) -> list[float]:
    """The clips re-encoded end to end into one mp4 (H.264 at `fps`, AAC 16 kHz mono); the join times."""
    joins, n, ns = [], 0, 0
    with av.open(str(out), "w") as c:
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "20"})
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        aus = c.add_stream("aac", rate=16000, layout="mono")
        for p in paths:
            info = decode.probe(p)
            k = round(info.duration * fps)
            idx = [min(info.n_frames - 1, round(i * info.fps / fps)) for i in range(k)]
            for f in decode.read_frames(p, idx, max_side=None, info=info):
                vf = av.VideoFrame.from_ndarray(np.asarray(Image.fromarray(f).resize(size)), format="rgb24")
                vf.pts = n
                n += 1
                for pkt in vs.encode(vf):
                    c.mux(pkt)
            wav = decode.read_audio(p)
            want = round(k / fps * 16000)
            s16 = (np.clip(np.pad(wav, (0, max(0, want - len(wav))))[:want], -1, 1) * 32767).astype(np.int16)
            for i in range(0, len(s16), 1024):
                af = av.AudioFrame.from_ndarray(s16[None, i:i + 1024].copy(), format="s16", layout="mono")
                af.rate, af.pts = 16000, ns
                ns += af.samples
                for pkt in aus.encode(af):
                    c.mux(pkt)
            joins.append(n / fps)
        for s in (vs, aus):
            for pkt in s.encode():
                c.mux(pkt)
    return joins[:-1]


@pytest.fixture(scope="module")
def joined(tmp_path_factory, samples_dir):
    from tiny_runs import tiny_run

    tmp = tmp_path_factory.mktemp("timeline")
    run, _, _ = tiny_run(tmp, clips=6, seed=7)
    # three clips that hold no cut of their own, of different lengths
    single = [p for p in sorted(samples_dir.glob("sample_*.mp4")) if not scan_cuts(p)[0]]
    parts = [single[1], single[2], single[-2]]
    video = tmp / "interview.mp4"
    joins = join_clips(parts, video)
    return {"run": run, "video": video, "joins": joins, "duration": decode.probe(video).duration, "tmp": tmp}


def expected_windows(length: float, window: float, hop: float) -> int:
    return 1 if length <= window else math.ceil((length - window) / hop - 1e-9) + 1


@pytest.mark.slow
def test_a_joined_video_gets_windows_inside_each_part_and_its_joins_as_cuts(joined):
    out = joined["tmp"] / "out"
    res = runner.invoke(app, ["timeline", str(joined["video"]), "--run", str(joined["run"]), "--window", "3",
                              "--hop", "1.5", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    joins, duration = joined["joins"], joined["duration"]
    # one cut at each join (scanned at 5 frames a second: within 0.2 s after it), none elsewhere
    assert len(r["cuts"]) == len(joins) == 2
    for cut, join in zip(r["cuts"], joins):
        assert join - 1e-6 <= cut <= join + 0.21, (r["cuts"], joins)
    bounds = [0.0, *r["cuts"], r["duration"]]
    assert abs(r["duration"] - duration) < 0.05
    want = sum(expected_windows(b - a, 3, 1.5) for a, b in zip(bounds, bounds[1:]))
    windows = r["windows"]
    assert len(windows) == want
    for w in windows:                                   # never across a cut, and inside the video
        a, b = bounds[w["shot"]], bounds[w["shot"] + 1]
        assert a - 1e-6 <= w["start"] < w["end"] <= b + 1e-6 and w["end"] - w["start"] <= 3 + 1e-6
        assert w["label"] in r["labels"] and abs(sum(w["probabilities"].values()) - 1) < 1e-5
        assert w["extracted"] is True and w["error"] is None
    assert [w["shot"] for w in windows] == sorted(w["shot"] for w in windows) and windows[-1]["shot"] == 2
    assert "tiny profile" in r["note"]
    rows = list(csv.DictReader(open(out / "timeline.csv")))
    assert len(rows) == want and [f"p_{l}" for l in r["labels"]] == list(rows[0])[5:5 + len(r["labels"])]
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert json.loads((out / "timeline.json").read_text())["cuts"] == r["cuts"]
    # a rerun writes the same windows again, byte for byte, so the eval store answers them all
    res = runner.invoke(app, ["timeline", str(joined["video"]), "--run", str(joined["run"]), "--window", "3",
                              "--hop", "1.5", "--out", str(out), "--json"])
    again = json.loads(res.output)
    assert res.exit_code == 0 and not any(w["extracted"] for w in again["windows"])
    assert [w["probabilities"] for w in again["windows"]] == [w["probabilities"] for w in windows]


@pytest.mark.slow
def test_across_cuts_the_windows_ignore_the_shots_and_the_cuts_are_still_marked(joined):
    res = runner.invoke(app, ["timeline", str(joined["video"]), "--run", str(joined["run"]), "--window", "4",
                              "--hop", "4", "--across-cuts", "--out", str(joined["tmp"] / "across"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert len(r["cuts"]) == 2
    assert len(r["windows"]) == expected_windows(r["duration"], 4, 4)
    assert {w["shot"] for w in r["windows"]} == {0}
    assert any(w["start"] < r["cuts"][0] < w["end"] for w in r["windows"])   # a window spans the first join


def test_the_window_plan_is_exact():
    ws, short = plan_windows(10.0, 4, 2)
    assert [(w.start, w.end) for w in ws] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    ws, short = plan_windows(11.0, 4, 2, cuts=[5.0, 5.2])
    assert [(w.start, w.end, w.shot) for w in ws] == [(0, 4, 0), (1, 5, 0), (5.2, 9.2, 2), (7.0, 11.0, 2)]
    assert short == [(5.0, 5.2)] and 0.2 < MIN_SHOT_S
    ws, _ = plan_windows(2.5, 4, 2)
    assert [(w.start, w.end) for w in ws] == [(0, 2.5)]
    with pytest.raises(ValueError):
        plan_windows(10, 0, 1)


def test_bad_options_are_listed_in_one_line(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    res = runner.invoke(app, ["timeline", str(tmp_path / "v.mp4"), "--run", str(tmp_path), "--window", "2",
                              "--hop", "3", "--cut-distance", "0"])
    assert res.exit_code == 2
    [err] = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert "zero length" in err or "empty" in err
    assert "--hop 3 is longer than --window 2" in err and "--cut-distance 0" in err


MEMORY = """
import resource, sys, tempfile, av, numpy as np
from emollama.extract.windows import plan_windows, scan_cuts, write_windows
path, seconds = sys.argv[1], int(sys.argv[2])
with av.open(path, "w") as c:
    vs = c.add_stream("libx264", rate=10, options={"preset": "ultrafast"})
    vs.width, vs.height, vs.pix_fmt = 96, 64, "yuv420p"
    a = c.add_stream("aac", rate=16000, layout="mono")
    rng = np.random.default_rng(0)
    for i in range(seconds * 10):
        f = av.VideoFrame.from_ndarray(np.full((64, 96, 3), (i * 7) % 255, np.uint8), format="rgb24"); f.pts = i
        for p in vs.encode(f): c.mux(p)
    for i in range(seconds * 16000 // 1024):
        af = av.AudioFrame.from_ndarray((rng.standard_normal((1, 1024)) * 3000).astype(np.int16), format="s16", layout="mono")
        af.rate, af.pts = 16000, i * 1024
        for p in a.encode(af): c.mux(p)
    for s in (vs, a):
        for p in s.encode(): c.mux(p)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cuts, duration = scan_cuts(path)
ws, _ = plan_windows(duration, 4, 2)
n = 0
with tempfile.TemporaryDirectory() as d:
    for w, p in write_windows(path, ws, d):
        p.unlink(); n += 1
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


@pytest.mark.slow
def test_memory_stays_bounded_for_any_length(tmp_path):
    """Six times the video, the same memory: the windows are decoded and written as a stream."""
    got = {}
    for seconds in (20, 120):
        res = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / f"v{seconds}.mp4"), str(seconds)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        n, grew_kb = map(int, res.stdout.split())
        got[seconds] = (n, grew_kb)
    assert got[20][0] == expected_windows(20.0, 4, 2) and got[120][0] == expected_windows(120.0, 4, 2)
    assert got[120][1] - got[20][1] < 30_000, got      # KB: within 30 MB of the 20 s video's

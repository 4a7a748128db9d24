"""Benchmark `emollama timeline` (not a test): peak memory and wall time for videos of several lengths.

    python scripts/bench_timeline.py [--minutes 2,30] [--window 4] [--hop 2] [--run RUN]

Each video is made by looping the synthetic sample's clips (real H.264 + AAC mp4s with a drawn face and a
voice; tiny profile) end to end, re-encoded at 25 fps, 320x180. Each length runs `run_timeline` in a fresh
process (the run loaded, windows across cuts so that every window of the video is predicted, the eval store
new), which reports its resident memory once the run is loaded and its peak at the end (ru_maxrss). Without
--run, a tiny run is trained on the synthetic sample first: a fixture, so the numbers say how much memory and
time the machinery takes, nothing about emotion recognition.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FPS, SIZE, RATE = 25, (320, 180), 16000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_video(clips: list[Path], out: Path, minutes: float) -> float:
    """``clips`` looped end to end into ``out`` until ``minutes`` long; its length in seconds."""
    import av
    import numpy as np
    from PIL import Image

    from emollama.extract import decode

    parts = []
    for p in clips:   # each clip decoded once (small: a few seconds at 320x180), then written again and again
        info = decode.probe(p)
        k = round(info.duration * FPS)
        idx = [min(info.n_frames - 1, round(i * info.fps / FPS)) for i in range(k)]
        frames = [np.asarray(Image.fromarray(f).resize(SIZE)) for f in decode.read_frames(p, idx, max_side=None,
                                                                                          info=info)]
        audio = decode.read_audio(p, sample_rate=RATE)[: round(k / FPS * RATE)]
        audio = np.pad(audio, (0, round(k / FPS * RATE) - len(audio)))
        parts.append((frames, audio))
    total = round(minutes * 60 * FPS)
    n = ns = 0
    with av.open(str(out), "w") as c:
        vs = c.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "23"})
        vs.width, vs.height, vs.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        aus = c.add_stream("aac", rate=RATE, layout="mono")
        i = 0
        while n < total:
            frames, audio = parts[i % len(parts)]
            i += 1
            for f in frames[: total - n]:
                vf = av.VideoFrame.from_ndarray(f, format="rgb24")
                vf.pts = n
                n += 1
                for pkt in vs.encode(vf):
                    c.mux(pkt)
            a = audio[: round(len(frames) / FPS * RATE)]
            for j in range(0, len(a), 1024):
                chunk = a[j:j + 1024]
                af = av.AudioFrame.from_ndarray((chunk[None] * 32767).astype(np.int16), format="s16", layout="mono")
                af.rate, af.pts = RATE, ns
                ns += len(chunk)
                for pkt in aus.encode(af):
                    c.mux(pkt)
        for s in (vs, aus):
            for pkt in s.encode():
                c.mux(pkt)
    return n / FPS


def child(run: str, video: str, window: float, hop: float) -> None:
    """One timeline in this process: the JSON line of its windows, seconds and memory."""
    from emollama.pipeline.features import run_stores
    from emollama.pipeline.inference import Predictor
    from emollama.pipeline.timeline import TimelineSettings, run_timeline
    from emollama.train.run import load_run

    loaded = load_run(run, device="cpu")
    cache = tempfile.mkdtemp(prefix="bench-timeline-store-")
    predictor = Predictor(loaded, run_stores(loaded, None, cache + "/eval-store.zarr"), say=lambda s: None)
    ready = _rss_mb()
    t = time.perf_counter()
    res = run_timeline(predictor, video, TimelineSettings(window=window, hop=hop, follow_cuts=False),
                       out=Path(cache) / "out")
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    failed = sum(1 for w in res.windows if w.error)
    print(json.dumps({"duration_s": res.duration, "windows": len(res.windows), "failed": failed,
                      "wall_s": round(wall, 1), "rss_ready_mb": round(ready), "peak_rss_mb": round(peak)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", default="2,30", help="comma-separated video lengths in minutes")
    ap.add_argument("--window", type=float, default=4.0)
    ap.add_argument("--hop", type=float, default=2.0)
    ap.add_argument("--run", help="a run folder (default: a tiny run trained on the synthetic sample)")
    ap.add_argument("--child", nargs=2, metavar=("RUN", "VIDEO"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.window, a.hop)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_serve import _tiny_run
    from emollama.extract.sample import write_sample

    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as d:
        tmp = Path(d)
        run = Path(a.run) if a.run else _tiny_run(tmp, 8)[0]
        clips = sorted(write_sample(tmp / "looped", clips=12, seed=3).rglob("*.mp4"))
        rows = []
        for m in [float(x) for x in a.minutes.split(",")]:
            video = tmp / f"video-{m:g}min.mp4"
            t = time.perf_counter()
            seconds = make_video(clips, video, m)
            made = time.perf_counter() - t
            res = subprocess.run([sys.executable, __file__, "--child", str(run), str(video), "--window", str(a.window),
                                  "--hop", str(a.hop)], capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row.update(minutes=m, video_mb=round(video.stat().st_size / 2**20, 1), made_s=round(made, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| video | windows | wall | per window | RSS once loaded | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']:g} min ({r['video_mb']} MB) | {r['windows']} ({r['failed']} failed) | {r['wall_s']:.0f} s "
              f"| {r['wall_s'] / max(1, r['windows']):.2f} s | {r['rss_ready_mb']} MB | {r['peak_rss_mb']} MB |")
    print("NOTE: tiny profile (random models): a fixture; memory and time of the machinery only.")


if __name__ == "__main__":
    main()

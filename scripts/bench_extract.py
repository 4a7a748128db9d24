"""Benchmark stage one (not a test): clips/s, where the time goes, and what the overlap buys.

    python scripts/bench_extract.py [--clips 48] [--prep-workers P] [--no-loop] [--slow-seconds 0.05]
                                    [--real-size [--clip PATH]]

1. The synthetic sample with the tiny profile through the pipeline (in process, P preparation
   processes): clips/s, the time split, and the encoding side's busy share of the wall time (what a
   GPU worker would keep its GPU busy with). Tiny models are random fixtures: their numbers say
   nothing of accuracy.
2. The same clips and models through a plain clip-by-clip loop (decode, detect, encode one clip at
   a time with batch 1, in one process, the way MERTools extracts): once with MTCNN on every frame it
   samples (MERTools' way), once with the pipeline's own face settings; and the ratios. The loop runs
   in a child process with OpenMP's default wait policy; the pipeline, like `emollama extract`, lets
   idle torch threads sleep (OMP_WAIT_POLICY=PASSIVE). The exit status is 1 below 2x the MERTools way.
3. The overlap without a GPU: every view is the `slow_device` encoder (a sleep per micro-batch, no
   CPU), so preparation is the bottleneck; P=2 preparation processes must give >= 1.7x the clips/s of
   P=1 (best of 2 interleaved runs each). The exit status is 1 when they do not.
4. With --real-size: one real clip (the first of ../shared/samples/mer2023-examples, or --clip)
   through randomly initialised REAL-SIZE HuBERT-large and VideoMAE-large (no download), to time
   the heavy encoders on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# as `emollama extract` does before torch loads (extract.prep.sleeping_idle_threads); the clip-by-clip
# loop runs in a child process with OpenMP's default instead (spinning suits one process alone)
OMP_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_config(data: Path, store: Path, **extract):
    from emollama.pipeline.config import load_config

    return load_config(None, {"dataset": {"kind": "merr", "root": str(data)},
                              "extract": {"store": str(store), "profile": "tiny", "workers": 0, "compact": False,
                                          **extract}})


ENCODE_STAGES = ("audio", "local", "temporal", "global")


def busy_line(s) -> str:
    """The encoding process's busy share of wall time (what a GPU worker would keep its GPU busy with)."""
    enc = sum(v for k, v in s.seconds.items() if k in ENCODE_STAGES)
    busy = enc + s.seconds.get("write", 0.0) + s.seconds.get("preview", 0.0)
    return (f"encoding-side busy: {100 * busy / s.wall:.0f}% of wall (encoders {100 * enc / s.wall:.0f}%, "
            f"waiting for prepared clips {100 * s.seconds.get('wait', 0.0) / s.wall:.0f}%)")


def clip_by_clip(data: Path, settings, detect_every: int) -> tuple[int, float, dict[str, float]]:
    """The plain loop (the way MERTools extracts): one clip at a time in this process, decode, detect,
    then each encoder on that clip with batch 1 (one image per forward), each output saved as .npy.
    Same encoders and face detector as the pipeline; MTCNN on every `detect_every`-th anchor frame."""
    import dataclasses

    import tempfile

    import numpy as np

    from emollama.corpora import load_corpus
    from emollama.extract import step

    settings = dataclasses.replace(settings, batch_size=1, micro_batch=1, prep_workers=0,
                                   faces=dataclasses.replace(settings.faces, detect_every=detect_every))
    m = step.models(settings)   # loaded before the clock starts, as in the pipeline's warm-up
    clips = load_corpus("merr", data).clips
    sec: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="emollama-loop-") as out:
        t0 = time.perf_counter()
        for c in clips:
            p = step.prepare(step.ClipJob(c.id, str(c.source)), settings, m.detector)
            for k, v in p.seconds.items():
                sec[k] = sec.get(k, 0.0) + v
            if p.error:
                continue
            for name, arr in step.encode([p], m, sec)[0].items():
                np.save(Path(out) / f"{c.id}.{name}.npy", arr)
        wall = time.perf_counter() - t0
    return len(clips), wall, sec


def clip_by_clip_child(data: Path, detect_every: int) -> tuple[int, float, dict[str, float]]:
    """`clip_by_clip` in a child process with OpenMP's default wait policy (what a plain script gets)."""
    import json
    import subprocess

    env = dict(os.environ)
    if OMP_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, __file__, "--loop-only", str(data), str(detect_every)], env=env,
                         check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return got["n"], got["wall"], got["seconds"]


def bench_sample(clips: int, workers: int, prep: int | None, loop: bool) -> bool:
    from emollama.extract.prep import default_workers
    from emollama.extract.sample import write_sample
    from emollama.pipeline.extraction import run_extract, settings_from

    with tempfile.TemporaryDirectory(prefix="emollama-bench-") as tmp:
        t = time.perf_counter()
        data = write_sample(Path(tmp) / "data", clips=clips, seed=0)
        print(f"sample: {clips} synthetic clips written in {time.perf_counter() - t:.1f} s "
              f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")
        extra = {"workers": workers} | ({} if prep is None else {"prep_workers": prep})
        cfg = sample_config(data, Path(tmp) / "store.zarr", **extra)
        # warm-up: build/load the tiny models and start the preparation processes, outside the timing
        run_extract(sample_config(data, Path(tmp) / "warm.zarr", **extra), progress=False, limit=2)
        s = run_extract(cfg, progress=sys.stderr.isatty())
        n = len(s.ok)
        p = default_workers() if prep is None else prep
        print(f"\n== stage one, tiny profile (random weights: a fixture, not a result), {n} clips, "
              f"{s.executor}, {p} preparation process(es) ==")
        print(f"clips/s: {n / s.wall:.2f}  (wall {s.wall:.1f} s, {len(s.failed)} failed)")
        print(busy_line(s))
        total = sum(v for k, v in s.seconds.items() if k != "wait")
        print(f"{'stage':<10} {'seconds':>8} {'share':>6} {'s/clip':>7}   (decode, faces: summed over processes)")
        for stage, sec in sorted(s.seconds.items(), key=lambda kv: -kv[1]):
            if stage != "wait":
                print(f"{stage:<10} {sec:8.2f} {100 * sec / total:5.0f}% {sec / max(n, 1):7.3f}")
        if not loop:
            return True
        settings = settings_from(cfg)
        print("\n== the same clips and models through a plain clip-by-clip loop (batch 1, one process, OpenMP's "
              "default wait policy) ==")
        rows = []
        for label, every in (("MERTools-style: MTCNN on every frame", 1),
                             (f"same face settings (detect_every={settings.faces.detect_every})",
                              settings.faces.detect_every)):
            k, wall, sec = clip_by_clip_child(data, every)
            rows.append((label, k / wall))
            print(f"{label:<44} {k / wall:6.2f} clips/s  (wall {wall:.1f} s; faces {sec.get('faces', 0):.1f} s, "
                  f"decode {sec.get('decode', 0):.1f} s)")
        rate = n / s.wall
        print(f"{'pipeline':<44} {rate:6.2f} clips/s")
        for label, r in rows:
            print(f"pipeline / {label}: {rate / r:.2f}x")
        mertools = rate / rows[0][1]
        print(f"pipeline / MERTools-style loop: {mertools:.2f}x  ({'PASS' if mertools >= 2 else 'FAIL'}: at least 2x expected)")
        return mertools >= 2


def bench_slow_device(clips: int, seconds: float, counts=(1, 2), repeats: int = 2) -> bool:
    """The overlap without a GPU: every view is the `slow_device` encoder (each call sleeps `seconds`,
    no CPU), so preparation is the bottleneck; P=2 preparation processes must give >= 1.7x P=1."""
    from emollama.extract.sample import write_sample
    from emollama.pipeline.extraction import run_extract

    with tempfile.TemporaryDirectory(prefix="emollama-slow-") as tmp:
        data = write_sample(Path(tmp) / "data", clips=clips, seed=0)
        stand_in = Path(tmp) / "stand-in"
        stand_in.mkdir()
        (stand_in / "README").write_text("the slow_device encoder reads nothing from its folder\n")
        encoders = {view: {"encoder": "slow_device", "model": str(stand_in), "input": kind, "seconds": seconds}
                    for view, kind in (("audio", "waveform"), ("local", "face_frames"),
                                       ("temporal", "face_clip"), ("global", "frame"))}
        print(f"\n== slow device: each of the 4 views sleeps {seconds * 1000:.0f} ms per micro-batch (no CPU), "
              f"{clips} synthetic clips, in process ==")
        rates: dict[int, float] = {}
        for rep in range(repeats):   # interleaved, best of `repeats`: this machine's speed drifts by ~10%
            for p in counts:
                def cfg(name):
                    return sample_config(data, Path(tmp) / f"{name}-{rep}.zarr", prep_workers=p, encoders=encoders)
                run_extract(cfg(f"warm{p}"), progress=False, limit=2)   # models and processes, untimed
                s = run_extract(cfg(f"p{p}"), progress=False)
                rate = len(s.ok) / s.wall
                rates[p] = max(rates.get(p, 0.0), rate)
                print(f"P={p}: {rate:.2f} clips/s  (wall {s.wall:.1f} s, {s.batch_clips} clips per task); "
                      f"{busy_line(s)}")
        ratio = rates[counts[1]] / rates[counts[0]]
        ok = ratio >= 1.7
        print(f"best of {repeats}: " + ", ".join(f"P={p} {r:.2f} clips/s" for p, r in rates.items()))
        print(f"P={counts[1]} / P={counts[0]}: {ratio:.2f}x  ({'PASS' if ok else 'FAIL'}: at least 1.7x expected)")
        return ok


def bench_real_size(clip: Path | None) -> None:
    import numpy as np
    import torch

    from emollama.extract import decode
    from emollama.extract.encoders import random_encoder

    if clip is None:
        samples = REPO.parent / "shared" / "samples" / "mer2023-examples"
        found = sorted(samples.glob("*.mp4"))
        if not found:
            print("--real-size: no clip given and ../shared/samples is absent; pass --clip PATH")
            return
        clip = found[0]
    info = decode.probe(clip)
    t = time.perf_counter()
    frames = decode.read_frames(clip, decode.segment_pair_indices(info.n_frames), info=info)
    audio = decode.read_audio(clip)
    t_dec = time.perf_counter() - t
    from emollama.extract.faces import FaceDetector

    t = time.perf_counter()
    track = FaceDetector().track(frames)
    t_face = time.perf_counter() - t
    print(f"\n== real sizes, random weights, {clip.name}: {info.duration:.1f} s, {info.width}x{info.height}, "
          f"torch threads {torch.get_num_threads()} ==")
    print(f"decode (16 frames + audio): {t_dec:.2f} s;  MTCNN on 16 frames: {t_face:.2f} s")
    for view, inputs in (("audio", [audio]), ("temporal", [track.crops])):
        enc = random_encoder(view, "large")
        enc.encode(inputs)   # warm-up
        t = time.perf_counter()
        out = enc.encode(inputs)
        dt = time.perf_counter() - t
        shapes = {k: tuple(np.asarray(v).shape) for k, v in out[0].items()}
        print(f"{view:<9} {enc.name:<9} {dt:6.2f} s  outputs {shapes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--workers", type=int, default=0, help="0 = in process; N = local dask workers")
    ap.add_argument("--prep-workers", type=int, default=None, help="preparation processes (default: auto)")
    ap.add_argument("--no-loop", action="store_true", help="skip the clip-by-clip loop")
    ap.add_argument("--slow-seconds", type=float, default=0.05,
                    help="the slow-device part: sleep per view and micro-batch (0: skip the part)")
    ap.add_argument("--real-size", action="store_true", help="also time real-size HuBERT/VideoMAE on one real clip")
    ap.add_argument("--clip", type=Path, default=None)
    ap.add_argument("--skip-sample", action="store_true")
    ap.add_argument("--loop-only", nargs=2, metavar=("DATA", "DETECT_EVERY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop_only:   # the child process of clip_by_clip_child
        import json

        from emollama.pipeline.extraction import settings_from

        data = Path(args.loop_only[0])
        n, wall, sec = clip_by_clip(data, settings_from(sample_config(data, data / "unused.zarr")),
                                    int(args.loop_only[1]))
        print(json.dumps({"n": n, "wall": wall, "seconds": sec}))
        return
    ok = True
    if not args.skip_sample:
        ok = bench_sample(args.clips, args.workers, args.prep_workers, not args.no_loop)
    if args.slow_seconds > 0:
        ok = bench_slow_device(args.clips, args.slow_seconds) and ok
    if args.real_size:
        bench_real_size(args.clip)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

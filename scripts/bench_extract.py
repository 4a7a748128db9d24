"""Benchmark stage one (not a test): clips/s and where the time goes.

    python scripts/bench_extract.py [--clips 12] [--workers 0] [--real-size [--clip PATH]]

1. The synthetic sample with the tiny profile: clips/s and the split between decoding, faces,
   each encoder and writing. Tiny models are random fixtures: their numbers say nothing of accuracy.
2. With --real-size: one real clip (the first of ../shared/samples/mer2023-examples, or --clip)
   through randomly initialised REAL-SIZE HuBERT-large and VideoMAE-large (no download), to time
   the heavy encoders on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_sample(clips: int, workers: int) -> None:
    from emollama.extract.sample import write_sample
    from emollama.pipeline.config import load_config
    from emollama.pipeline.extraction import run_extract

    with tempfile.TemporaryDirectory(prefix="emollama-bench-") as tmp:
        t = time.perf_counter()
        data = write_sample(Path(tmp) / "data", clips=clips, seed=0)
        print(f"sample: {clips} synthetic clips written in {time.perf_counter() - t:.1f} s")
        cfg = load_config(None, {"dataset": {"kind": "merr", "root": str(data)},
                                 "extract": {"store": str(Path(tmp) / "store.zarr"), "profile": "tiny",
                                             "workers": workers, "compact": False}})
        # warm-up: build/load the tiny models once, outside the timing
        run_extract(cfg, progress=False, limit=1)
        s = run_extract(cfg, progress=True)
        n = len(s.ok)
        print(f"\n== stage one, tiny profile (random weights: a fixture, not a result), {n} clips, "
              f"{s.executor} ==")
        print(f"clips/s: {n / s.wall:.2f}  (wall {s.wall:.1f} s, {len(s.failed)} failed)")
        total = sum(s.seconds.values())
        print(f"{'stage':<10} {'seconds':>8} {'share':>6} {'s/clip':>7}")
        for stage, sec in sorted(s.seconds.items(), key=lambda kv: -kv[1]):
            print(f"{stage:<10} {sec:8.2f} {100 * sec / total:5.0f}% {sec / max(n, 1):7.3f}")


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
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--workers", type=int, default=0, help="0 = in process; N = local dask workers")
    ap.add_argument("--real-size", action="store_true", help="also time real-size HuBERT/VideoMAE on one real clip")
    ap.add_argument("--clip", type=Path, default=None)
    ap.add_argument("--skip-sample", action="store_true")
    args = ap.parse_args()
    if not args.skip_sample:
        bench_sample(args.clips, args.workers)
    if args.real_size:
        bench_real_size(args.clip)


if __name__ == "__main__":
    main()

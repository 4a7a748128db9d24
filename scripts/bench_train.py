"""Benchmark the stage-two loop (`make bench-train`; a benchmark, not a test).

Samples/s of our loop (batches of --batch clips, padding, length grouping) against a batch-1 loop
like the original trainer's (one clip per step, no grouping), on the same tiny model, features and
examples, in one run, printed as a ratio. Everything else (LoRA, projectors, AdamW, schedule, fp32
on CPU) is the same code. The tiny profile is a random fixture: only the speed means something.

usage: python scripts/bench_train.py [--data demo/data --store demo/store.zarr] [--samples 320] [--batch 8]
       [--features audio.hubert.mean ...]   (without a store: builds a 24-clip sample in a temp folder)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emollama.train.config import load_train_config  # noqa: E402
from emollama.train.loop import train  # noqa: E402

FEATURES = ["global.eva.tokens", "local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]


def build_store(tmp: Path) -> tuple[Path, Path]:
    from emollama.extract.sample import write_sample
    from emollama.pipeline.config import load_config
    from emollama.pipeline.extraction import run_extract

    data = write_sample(tmp / "data", clips=24, seed=0)
    store = tmp / "store.zarr"
    cfg = load_config(None, {"dataset": {"kind": "merr", "root": str(data)},
                             "extract": {"store": str(store), "profile": "tiny", "workers": 0}})
    run_extract(cfg, progress=False)
    return data, store


def run(data: Path, store: Path, out: Path, batch: int, samples: int, group: bool, features: list[str]) -> dict:
    cfg = load_train_config(None, {
        "data": {"root": str(data), "store": str(store), "features": features, "length_grouping": group},
        "model": {"profile": "tiny"}, "lora": {"alpha": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "steps": max(samples // batch, 1), "batch_size": batch},
        "run": {"out": str(out), "save_every": 10**9, "eval_every": 0, "seed": 0},
    })
    res = train(cfg)
    secs = res.metrics["train_seconds"]
    return {"batch": batch, "grouping": group, "steps": res.step, "samples": res.samples, "seconds": secs,
            "samples_per_s": res.samples / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo/data")
    ap.add_argument("--store", default="demo/store.zarr")
    ap.add_argument("--samples", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--features", nargs="+", default=FEATURES)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        data, store = Path(args.data), Path(args.store)
        if not (store.exists() and data.is_dir()):
            print(f"no store at {store}: building a 24-clip sample store in {tmp} (tiny encoders) ...")
            data, store = build_store(tmp)
        ours = run(data, store, tmp / "ours", args.batch, args.samples, True, args.features)
        orig = run(data, store, tmp / "batch1", 1, args.samples, False, args.features)
    ratio = ours["samples_per_s"] / orig["samples_per_s"]
    if args.json:
        print(json.dumps({"ours": ours, "batch1": orig, "ratio": ratio}, indent=2))
        return
    print(f"features: {', '.join(args.features)}  (tiny profile: a random fixture; only the speed means something)")
    for name, r in (("ours (batched, length-grouped)", ours), ("batch 1 (like the original)", orig)):
        print(f"{name:<32} batch {r['batch']:>2}  {r['samples']:>5} samples in {r['seconds']:6.1f} s  "
              f"{r['samples_per_s']:8.1f} samples/s")
    print(f"ratio: {ratio:.1f}x samples/s")


if __name__ == "__main__":
    main()

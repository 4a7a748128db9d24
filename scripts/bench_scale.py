"""Benchmark extraction across dask workers (not a test): clips/s with 1 and 2 workers, and the
scaling efficiency, in one run.

    python scripts/bench_scale.py [--clips 16] [--batch-clips 2] [--workers 1,2] [--threads N]

For each worker count: a local cluster is started (the cores shared out evenly: torch threads per
worker = cores // workers, unless --threads), every worker loads the tiny models once (timed apart
as "start"), then the synthetic sample is extracted into a fresh store and timed ("steady clips/s").
Efficiency = clips/s with N workers / (N x clips/s with 1 worker). The tiny profile's random models
are a fixture: the absolute numbers say how fast the machinery is, nothing about accuracy, and at
real sizes the encoders dominate even more (see `make bench-extract ARGS=--real-size`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover
        return "load average unknown"


def bench(data: Path, out: Path, workers: int, batch_clips: int, threads: int | None) -> dict:
    from emollama.extract.step import ClipJob, describe, run_batch
    from emollama.pipeline.config import load_config
    from emollama.pipeline.executors import DaskExecutor, InlineExecutor
    from emollama.pipeline.extraction import plan_tasks, settings_from, source_size
    from emollama.store import FeatureStore
    from emollama.corpora import load_corpus

    store_url = str(out / f"w{workers}.zarr")
    cfg = load_config(None, {"dataset": {"kind": "merr", "root": str(data)},
                             "extract": {"store": store_url, "profile": "tiny", "workers": workers,
                                         "batch_clips": batch_clips, "compact": False}})
    settings = settings_from(cfg)
    clips = load_corpus("merr", str(data)).clips
    jobs = [ClipJob(c.id, str(c.source)) for c in clips]
    tasks = plan_tasks(jobs, [source_size(Path(j.source)) for j in jobs], batch_clips)

    t0 = time.perf_counter()
    if workers == 0:
        import torch

        ex = InlineExecutor()
        if threads:
            torch.set_num_threads(threads)
        name = f"in-process, {torch.get_num_threads()} thread(s)"
        describe(settings)
    else:
        ex = DaskExecutor(workers=workers, threads_per_worker=threads)
        name = ex.name
        ex.client.run(describe, settings)          # every worker loads the models once
    start = time.perf_counter() - t0
    with ex:
        store = FeatureStore.open(store_url)
        keys = {n: store.ensure_set(spec) for n, spec in ex.call(describe, settings).items()}
        t1 = time.perf_counter()
        ok = failed = 0
        for _, result, error in ex.map_unordered(run_batch, tasks, settings=settings, store_url=store_url,
                                                 keys=keys):
            if error is not None:
                raise error
            ok += len(result.ok)
            failed += len(result.failed)
        steady = time.perf_counter() - t1
    assert failed == 0, f"{failed} clip(s) failed"
    return {"workers": workers, "name": name, "clips": ok, "tasks": len(tasks), "start": start, "steady": steady,
            "cps": ok / steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=16, help="synthetic clips (2 s, 320x240)")
    ap.add_argument("--batch-clips", type=int, default=2, help="clips per task")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (0 = in this process)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores // workers)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from emollama.extract.sample import write_sample
    from emollama.pipeline.executors import available_cores

    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="emollama-bench-scale-") as tmp:
        data = write_sample(Path(tmp) / "data", clips=args.clips, seed=0)
        print(f"{args.clips} synthetic clips, {args.batch_clips} per task, {available_cores()} core(s), {load()}")
        rows = [bench(data, Path(tmp), w, args.batch_clips, args.threads) for w in counts]
    base = next((r for r in rows if r["workers"] == 1), rows[0])
    print(f"\n== extraction across dask workers, tiny profile (random weights: a fixture, not a result) ==")
    print(f"{'workers':>7} {'start s':>8} {'steady s':>9} {'clips/s':>8} {'speed-up':>9} {'efficiency':>11}  executor")
    for r in rows:
        speedup = r["cps"] / base["cps"]
        eff = speedup / r["workers"] if r["workers"] else float("nan")
        print(f"{r['workers']:>7} {r['start']:8.1f} {r['steady']:9.1f} {r['cps']:8.2f} {speedup:8.2f}x {eff:10.0%}"
              f"  {r['name']}")
    print(f"({load()} at the end; 'start' = cluster start + model loading on every worker, not in clips/s)")


if __name__ == "__main__":
    main()

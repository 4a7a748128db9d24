"""Benchmark `emollama serve` (not a test): requests/s and p50/p95 latency over real HTTP, for clips the
store already holds and for new clips, in one run.

    python scripts/bench_serve.py [--clips 16] [--concurrency 8] [--run RUN] [--reason]

Without --run, a tiny run is trained on the synthetic sample first (a fixture: its random models say how
fast the machinery is, nothing about emotion recognition). The server runs in this process (uvicorn on a
free loopback port), and N client threads send multipart uploads at once:
- "in the store": the run's own training clips (found by their sha256, no extraction), without contact
  sheets (`sheet=false`, what a pipeline asks), then with them: the first time each clip is decoded and
  its faces tracked again to draw it, later the sheet is there;
- "new clips": synthetic clips of another seed, extracted on arrival into the run's eval store (the
  extraction draws their sheets), then the same clips again.
Reasoning text is off unless --reason (its tokens dominate a tiny run's latency).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_run(tmp: Path, clips: int) -> tuple[Path, Path]:
    from typer.testing import CliRunner

    from emollama.extract.sample import write_sample
    from emollama.pipeline.cli import app

    runner = CliRunner()
    data = write_sample(tmp / "data", clips=clips, seed=5)
    for args in (["extract", "--dataset", "merr", "--data", str(data), "--store", str(tmp / "store.zarr"),
                  "--profile", "tiny", "--no-progress"],
                 ["train", "--data", str(data), "--store", str(tmp / "store.zarr"), "--out", str(tmp / "run"),
                  "--profile", "tiny", "--steps", "4", "-b", "2", "--no-progress", "--json"]):
        res = runner.invoke(app, args)
        if res.exit_code:
            raise SystemExit(res.output)
    return tmp / "run", data


def _send(url: str, path: Path, sheet: bool = True) -> tuple[float, int, bool]:
    import httpx

    t = time.perf_counter()
    with open(path, "rb") as f:
        r = httpx.post(url + "v1/predict", files={"file": (path.name, f, "video/mp4")},
                       data={"sheet": str(sheet).lower()}, timeout=600)
    ok = r.status_code == 200
    return time.perf_counter() - t, r.status_code, ok and bool(r.json().get("extracted"))


def _round(url: str, clips: list[Path], concurrency: int, sheet: bool = True) -> dict:
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        got = list(ex.map(lambda p: _send(url, p, sheet), clips))
    wall = time.perf_counter() - t
    lat = sorted(g[0] for g in got)
    bad = [g[1] for g in got if g[1] != 200]
    if bad:
        raise SystemExit(f"requests failed with {bad}")
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return {"n": len(got), "rps": len(got) / wall, "p50": statistics.median(lat), "p95": p95,
            "extracted": sum(g[2] for g in got)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--reason", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvicorn

    from emollama.extract.sample import write_sample
    from emollama.pipeline.serve import ServeSettings, create_app, load_service

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("EMOLLAMA_HOME", str(tmp / "home"))
        if args.run is None:
            run, data = _tiny_run(tmp, args.clips)
            stored = sorted((data / "video").glob("*.mp4"))
        else:
            run, stored = args.run, []
        fresh = sorted((write_sample(tmp / "new", clips=args.clips, seed=99) / "video").glob("*.mp4"))
        service = load_service(ServeSettings(run=str(run), reason=args.reason, batch_max=args.concurrency,
                                             upload_dir=str(tmp / "uploads"), sheets_dir=str(tmp / "sheets")),
                               cache_store=str(tmp / "eval-store.zarr"))
        port = _free_port()
        srv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        while not srv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        rows = []
        try:
            _send(url, fresh[0])    # warm up (first-call costs), then a fresh sample for the timed rounds
            fresh = sorted((write_sample(tmp / "new2", clips=args.clips, seed=98) / "video").glob("*.mp4"))
            if stored:
                rows.append(("in the store, `sheet=false`", _round(url, stored, args.concurrency, sheet=False)))
                rows.append(("in the store, contact sheets made (decoded again, once)",
                             _round(url, stored, args.concurrency)))
                rows.append(("in the store, contact sheets made earlier", _round(url, stored, args.concurrency)))
            rows.append(("new clips (extracted on arrival, with their sheets)", _round(url, fresh, args.concurrency)))
            rows.append(("the same new clips again", _round(url, fresh, args.concurrency)))
        finally:
            srv.should_exit = True
            thread.join(timeout=10)
            service.close()
    note = " (tiny profile: a fixture, not a result)" if service.note else ""
    print(f"emollama serve, {args.concurrency} clients at once, reasoning {'on' if args.reason else 'off'}{note}, "
          f"{os.cpu_count()} cores")
    print("| clips | requests | requests/s | p50 latency | p95 latency | extracted |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['n']} | {r['rps']:.1f} | {r['p50']:.2f} s | {r['p95']:.2f} s | {r['extracted']} |")
    print("batch sizes the server ran:", service.batcher.batches)


if __name__ == "__main__":
    main()

"""Benchmark the feature store against one .npy per clip and one HDF5 file (`make bench-store`).

N clips x 4 feature sets (three 1024-d utterance vectors and a frame-level [40..60, 1024]), random
values. For each layout: write MB/s (of float32 input), random-read clips/s through a torch
Dataset + DataLoader (0 and 2 workers; all 4 sets per clip), bytes on disk and file count.
Targets: store reads >= npy reads, >= 20x fewer files than npy, <= 0.6x the bytes of float32 npy.

usage: python scripts/bench_store.py [--clips 5000] [--out DIR] [--commit 64] [--reads 4000] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from emollama.store import FeatureDataset, FeatureSpec, FeatureStore  # noqa: E402

SETS = {
    "audio.utt": FeatureSpec("audio.utt", "audio", "hubert", "bench", "last_hidden_state", "mean", (1024,)),
    "local.utt": FeatureSpec("local.utt", "local", "vitmae", "bench", "last_hidden_state", "mean", (1024,)),
    "temporal.utt": FeatureSpec("temporal.utt", "temporal", "videomae", "bench", "last_hidden_state", "mean", (1024,)),
    "audio.frames": FeatureSpec("audio.frames", "audio", "hubert", "bench", "last_hidden_state", "none",
                                (None, 1024), frame_rate=50.0),
}


def make_data(n: int, seed: int) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    ids = [f"sample_{i:08d}" for i in range(n)]
    data: dict[str, list[np.ndarray]] = {}
    for name, spec in SETS.items():
        if spec.variable:
            data[name] = [rng.standard_normal((int(t), 1024), dtype=np.float32) for t in rng.integers(40, 61, n)]
        else:
            block = rng.standard_normal((n, 1024), dtype=np.float32)
            data[name] = list(block)
    return ids, data


def disk_usage(path: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes)"""
    files = size = alloc = 0
    for dirpath, _, names in os.walk(path):
        for f in names:
            st = os.stat(os.path.join(dirpath, f))
            files += 1
            size += st.st_size
            alloc += st.st_blocks * 512
    return files, size, alloc


# ---------------------------------------------------------------- baselines
class NpyDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, ids: list[str]) -> None:
        self.root, self.ids = root, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        c = self.ids[i]
        return {"id": c, **{k: torch.from_numpy(np.load(self.root / k / f"{c}.npy")) for k in SETS}}


class H5Dataset(torch.utils.data.Dataset):
    def __init__(self, path: Path, ids: list[str]) -> None:
        self.path, self.ids, self._f, self._pid = path, ids, None, None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}

    def __getitem__(self, i: int) -> dict:
        import h5py

        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = h5py.File(self.path, "r"), os.getpid()
        c = self.ids[i]
        return {"id": c, **{k: torch.from_numpy(self._f[k][c][()]) for k in SETS}}


def write_npy(root: Path, ids, data) -> float:
    t = time.perf_counter()
    for k in SETS:
        (root / k).mkdir(parents=True)
        for c, x in zip(ids, data[k]):
            np.save(root / k / f"{c}.npy", x)
    return time.perf_counter() - t


def write_h5(path: Path, ids, data) -> float:
    import h5py

    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        for k in SETS:
            g = f.create_group(k)
            for c, x in zip(ids, data[k]):
                g.create_dataset(c, data=x)
    return time.perf_counter() - t


def write_store(root: Path, ids, data, commit: int) -> tuple[float, float, int, dict]:
    t = time.perf_counter()
    st = FeatureStore.open(root)
    keys = {k: st.ensure_set(s) for k, s in SETS.items()}
    w = st.writer("bench")
    for i, c in enumerate(ids):
        w.add(c, {keys[k]: data[k][i] for k in SETS})
        if w.pending >= commit:
            w.commit()
    w.commit()
    t_write = time.perf_counter() - t
    files_before = disk_usage(root)[0]
    t = time.perf_counter()
    r = st.compact()
    t_compact = time.perf_counter() - t
    return t_write, t_compact, files_before, r


def _list(items):
    return items


def read_rate(ds, n_reads: int, workers: int, batch: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=n_reads, generator=g)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                     collate_fn=_list, persistent_workers=False)
    t = time.perf_counter()
    n = 0
    for items in dl:
        n += len(items)
        assert all(len(it) == 1 + len(SETS) for it in items)
    return n / (time.perf_counter() - t)


def check_values(st: FeatureStore, ids, data, n: int = 50) -> None:
    rng = np.random.default_rng(1)
    pick = [ids[i] for i in rng.choice(len(ids), size=min(n, len(ids)), replace=False)]
    index = {c: i for i, c in enumerate(ids)}
    for k, spec in SETS.items():
        for c, x in zip(pick, st.read_many(pick, spec.key)):
            if not np.array_equal(x, data[k][index[c]].astype(np.float16)):
                raise AssertionError(f"store returned wrong values for {c} in {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--commit", type=int, default=64, help="clips per store commit")
    ap.add_argument("--reads", type=int, default=4000, help="random clip reads per measurement")
    ap.add_argument("--batch", type=int, default=32, help="DataLoader batch size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-store-"))
    out.mkdir(parents=True, exist_ok=True)
    for p in ("npy", "h5", "store"):
        shutil.rmtree(out / p, ignore_errors=True)
    (out / "h5").mkdir()
    print(f"generating {args.clips} clips x {len(SETS)} sets ...", flush=True)
    ids, data = make_data(args.clips, args.seed)
    mb = sum(x.nbytes for k in SETS for x in data[k]) / 1e6
    print(f"payload {mb:.0f} MB float32; work dir {out}", flush=True)

    rows = {}
    t = write_npy(out / "npy", ids, data)
    rows["npy (fp32, 1 file/clip/set)"] = {"write": t, "path": out / "npy",
                                           "ds": lambda: NpyDataset(out / "npy", ids)}
    t = write_h5(out / "h5" / "feats.h5", ids, data)
    rows["hdf5 (fp32, 1 dataset/clip/set)"] = {"write": t, "path": out / "h5",
                                               "ds": lambda: H5Dataset(out / "h5" / "feats.h5", ids)}
    t_write, t_compact, files_before, comp = write_store(out / "store", ids, data, args.commit)
    st = FeatureStore.open(out / "store", create=False)
    check_values(st, ids, data)
    t0 = time.perf_counter()
    fds = FeatureDataset(st, list(SETS))
    t_open = time.perf_counter() - t0
    rows["store (fp16, zarr)"] = {"write": t_write, "path": out / "store", "ds": lambda: fds}
    del data

    for name, r in rows.items():
        r["files"], r["bytes"], r["alloc"] = disk_usage(r["path"])
        ds = r["ds"]()
        read_rate(ds, min(256, args.reads), 0, args.batch, args.seed + 99)  # warm up
        r["read0"] = read_rate(ds, args.reads, 0, args.batch, args.seed)
        r["read2"] = read_rate(ds, args.reads, 2, args.batch, args.seed + 1)
        print(f"  measured {name}", flush=True)

    print()
    print(f"{args.clips} clips x {len(SETS)} sets, payload {mb:.0f} MB fp32; reads: {args.reads} random clips, "
          f"all {len(SETS)} sets each, DataLoader batch {args.batch}")
    hdr = f"{'layout':<34}{'write MB/s':>11}{'read/s w0':>11}{'read/s w2':>11}{'MB':>9}{'MB alloc':>10}{'files':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        print(f"{name:<34}{mb / r['write']:>11.0f}{r['read0']:>11.0f}{r['read2']:>11.0f}"
              f"{r['bytes'] / 1e6:>9.1f}{r['alloc'] / 1e6:>10.1f}{r['files']:>8}")
    print()
    print(f"store: write {t_write:.1f} s in commits of {args.commit} clips, then compact {t_compact:.1f} s; "
          f"files {files_before} before compaction -> {rows['store (fp16, zarr)']['files']} after; "
          f"dataset open {t_open:.2f} s (in memory: {', '.join(s.split('-')[0] for s in fds.in_memory_keys)})")
    npy, sto = rows["npy (fp32, 1 file/clip/set)"], rows["store (fp16, zarr)"]
    checks = [
        ("reads at least as fast as npy-per-clip (0 workers)", sto["read0"] >= npy["read0"],
         f"{sto['read0']:.0f} vs {npy['read0']:.0f} clips/s"),
        ("reads at least as fast as npy-per-clip (2 workers)", sto["read2"] >= npy["read2"],
         f"{sto['read2']:.0f} vs {npy['read2']:.0f} clips/s"),
        ("at least 20x fewer files than npy", sto["files"] * 20 <= npy["files"],
         f"{npy['files'] / sto['files']:.0f}x fewer ({sto['files']} vs {npy['files']})"),
        ("at most 0.6x the bytes of float32 npy", sto["bytes"] <= 0.6 * npy["bytes"],
         f"{sto['bytes'] / npy['bytes']:.2f}x"),
    ]
    print()
    for what, ok, detail in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {what}: {detail}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(0 if all(ok for _, ok, _ in checks) else 1)


if __name__ == "__main__":
    main()

"""Import and export: a folder of one ``<clip>.npy`` per clip, and HDF5 files.

The features released by the Emotion-LLaMA authors (``HL-UTT/``, ``mae_340_UTT/``, ``maeV_399_UTT/``)
are npy folders whose name is their only description; importing them means declaring what they are
with a :class:`FeatureSpec`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .spec import FeatureSpec
from .store import FeatureStore

log = logging.getLogger(__name__)

__all__ = ["import_npy_folder", "import_hdf5", "export_hdf5", "export_npy", "ImportResult"]

BATCH = 256  # clips per commit when importing


class ImportResult(dict):
    """{"key": set key, "imported": n, "skipped": n already complete}"""


def _fit(spec: FeatureSpec, clip: str, x: np.ndarray) -> np.ndarray:
    """Accept singleton leading dims around the declared shape (e.g. (1, 1024) for (1024,))."""
    x = np.asarray(x)
    while x.ndim > len(spec.shape) and x.shape[0] == 1:
        x = x[0]
    return spec.check(clip, x)


def _write_all(store: FeatureStore, spec: FeatureSpec, items: Iterator[tuple[str, np.ndarray, dict]],
               config: dict | None, batch: int) -> ImportResult:
    key = store.ensure_set(spec, config)
    done = store.complete(key)
    n = skipped = 0
    w = store.writer(f"import-{spec.name}")
    for clip, x, rec in items:
        if clip in done:
            skipped += 1
            continue
        w.add(clip, {key: _fit(spec, clip, x)}, rec)
        n += 1
        if w.pending >= batch:
            w.commit()
    w.commit()
    log.info("imported %d clips into %s (%d already there)", n, key, skipped)
    return ImportResult(key=key, imported=n, skipped=skipped)


def import_npy_folder(store: FeatureStore, folder: str | Path, spec: FeatureSpec, *, config: dict | None = None,
                      batch: int = BATCH) -> ImportResult:
    """Import ``folder/<clip>.npy`` (one array per clip) as the set ``spec``; clips already complete
    are skipped, so a rerun after an interruption finishes the job."""
    folder = Path(folder)
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"no .npy files in {folder} (expected one <clip_id>.npy per clip)")
    items = ((f.stem, np.load(f, allow_pickle=False), {"imported_from": str(f)}) for f in files)
    return _write_all(store, spec, items, {"imported_from": str(folder), **(config or {})}, batch)


def import_hdf5(store: FeatureStore, path: str | Path, spec: FeatureSpec, dataset_path: str | None = None, *,
                config: dict | None = None, batch: int = BATCH) -> ImportResult:
    """Import an HDF5 file holding one dataset per clip (named by clip id) under a group
    (``dataset_path``, default the file's root)."""
    import h5py

    path = Path(path)

    def items() -> Iterator[tuple[str, np.ndarray, dict]]:
        with h5py.File(path, "r") as f:
            group = f[dataset_path] if dataset_path else f
            if not isinstance(group, h5py.Group):
                raise ValueError(f"{path}:{dataset_path} is a dataset; point dataset_path at the group that "
                                 "holds one dataset per clip")
            names = sorted(k for k, v in group.items() if isinstance(v, h5py.Dataset))
            if not names:
                raise ValueError(f"{path}:{dataset_path or '/'} holds no datasets (expected one per clip)")
            for name in names:
                yield name, group[name][()], {"imported_from": f"{path}:{group[name].name}"}

    return _write_all(store, spec, items(), {"imported_from": str(path), **(config or {})}, batch)


def _chunks(seq: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def export_hdf5(store: FeatureStore, keys: Sequence[str], path: str | Path, *, clip_ids: Sequence[str] | None = None,
                batch: int = BATCH) -> int:
    """Write ``/<set key>/<clip id>`` datasets (stored dtype) with the spec in each group's attrs.
    Returns the number of datasets written."""
    import h5py

    n = 0
    with h5py.File(Path(path), "w") as f:
        f.attrs["emollama_store"] = store.url
        for k in keys:
            key = store.resolve(k)
            spec = store.sets()[key]
            g = f.create_group(key)
            g.attrs["name"] = spec.name
            g.attrs["spec"] = json.dumps(spec.to_dict(), sort_keys=True)
            ids = sorted(store.complete(key)) if clip_ids is None else list(clip_ids)
            for part in _chunks(ids, batch):
                for clip, x in zip(part, store.read_many(part, key)):
                    g.create_dataset(clip, data=x)
                    n += 1
    return n


def export_npy(store: FeatureStore, key: str, folder: str | Path, *, clip_ids: Sequence[str] | None = None,
               batch: int = BATCH) -> int:
    """Write ``folder/<clip id>.npy`` (stored dtype) and ``folder/spec.json``. Returns the clip count."""
    key = store.resolve(key)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = store.sets()[key]
    (folder / "spec.json").write_text(json.dumps({"key": key, **spec.to_dict()}, indent=2, sort_keys=True))
    ids = sorted(store.complete(key)) if clip_ids is None else list(clip_ids)
    n = 0
    for part in _chunks(ids, batch):
        for clip, x in zip(part, store.read_many(part, key)):
            np.save(folder / f"{clip}.npy", x)
            n += 1
    return n

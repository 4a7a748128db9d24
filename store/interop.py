"""Import and export: a folder of one ``<clip>.npy`` per clip, and HDF5 files.

The features released by the Emotion-LLaMA authors are npy folders (one ``<clip>.npy`` per clip,
each ``[1024]`` or ``[1, 1024]``) whose name is their only description. :data:`RELEASED` maps those
folder names to what they are, so that ``emollama store import STORE mae_340_UTT/`` (or
:func:`import_released`) needs no flags::

    folder                 set name                                  modality  encoder
    mae_340_UTT            local.mae_340_utt.released                local     released:mae_340_UTT
    maeV_399_UTT           temporal.maev_399_utt.released            temporal  released:maeV_399_UTT
    HL-UTT                 audio.hl_utt.released                     audio     released:HL-UTT
    mae_340_23_UTT         local.mae_340_23_utt.released             local     released:mae_340_23_UTT
    maeVideo_399_23_UTT    temporal.maevideo_399_23_utt.released     temporal  released:maeVideo_399_23_UTT
    HL_23_UTT              audio.hl_23_utt.released                  audio     released:HL_23_UTT

(the name is ``<modality>.<folder, lower case, '-' -> '_'>.released``; the first three are MER2023's,
the ``_23`` ones MER2024's). Every preset is shape ``(1024,)``, pooling ``mean``, weights
``authors:<folder>`` (the authors' checkpoints, not distributed with the features), and params
``{"source": ..., "release": ..., "folder": ..., "description": ...}``; see :func:`released_spec`.

Imports keep the source precision by default (``dtype="keep"``, see :func:`storage_dtype`): float16
and float32 files are stored as they are, bit for bit; float64 (and integer) files as float32, with
the source dtype noted in the set's config. A clip whose values are not finite as stored (NaN, Inf, or
a value beyond float16's range in a float16 set) stops the import with ``NonFiniteError`` naming its
file (:func:`non_finite`); the clips committed before it stay, and a rerun skips them.

Exports never replace an existing file or fill a non-empty folder unless ``force`` is given; an
HDF5 export is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from .spec import FeatureSpec
from .store import FeatureStore

log = logging.getLogger(__name__)

__all__ = ["import_npy_folder", "import_hdf5", "export_hdf5", "export_npy", "ImportResult", "RELEASED",
           "ReleasedPreset", "released_preset", "released_spec", "import_released", "storage_dtype", "first_npy",
           "non_finite", "NonFiniteError", "ExportExistsError"]

BATCH = 256  # clips per commit when importing


class ReleasedPreset(NamedTuple):
    """What one released feature folder holds."""

    modality: str
    release: str  # "MER2023" | "MER2024"
    layer: str
    description: str

    def name(self, folder: str) -> str:
        return f"{self.modality}.{folder.lower().replace('-', '_')}.released"


_LOCAL = ("MAE ViT-L/16 self-supervised by the authors on unlabelled MER2023 face crops (OpenFace), 224 px; "
          "mean over the sampled face frames of the final-norm output, 1024-d")
_TEMPORAL = ("VideoMAE ViT-L self-supervised by the authors on unlabelled MER2023 clips, 16 face frames (224 px); "
             "mean of the output tokens, 1024-d")
_AUDIO = "chinese-hubert-large utterance mean: mean over time of the last hidden layer, 16 kHz mono, 1024-d"

#: Released folder name -> preset (see the module docstring for the resulting set names).
RELEASED: dict[str, ReleasedPreset] = {
    "mae_340_UTT": ReleasedPreset("local", "MER2023", "last_hidden_state (final norm)", _LOCAL),
    "maeV_399_UTT": ReleasedPreset("temporal", "MER2023", "last_hidden_state", _TEMPORAL),
    "HL-UTT": ReleasedPreset("audio", "MER2023", "last_hidden_state", _AUDIO),
    "mae_340_23_UTT": ReleasedPreset("local", "MER2024", "last_hidden_state (final norm)", _LOCAL),
    "maeVideo_399_23_UTT": ReleasedPreset("temporal", "MER2024", "last_hidden_state", _TEMPORAL),
    "HL_23_UTT": ReleasedPreset("audio", "MER2024", "last_hidden_state", _AUDIO),
}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def released_preset(folder: str | Path) -> tuple[str, ReleasedPreset] | None:
    """``(canonical folder name, preset)`` when ``folder``'s last component is a released feature folder
    (matched ignoring case and '-' vs '_'), else None."""
    base = Path(folder).name or Path(folder).resolve().name
    hits = [k for k in RELEASED if _norm(k) == _norm(base)]
    return (hits[0], RELEASED[hits[0]]) if hits else None


def released_spec(folder: str | Path, *, dtype: str = "float32", **overrides: Any) -> FeatureSpec:
    """The spec of a released feature folder (``mae_340_UTT``, ``HL-UTT``, ...): the preset's name,
    modality, encoder ``released:<folder>``, weights ``authors:<folder>``, layer, pooling ``mean``,
    shape ``(1024,)`` and params; ``overrides`` replace any FeatureSpec field (``params`` are merged).
    Raises KeyError for a folder that is not a preset."""
    hit = released_preset(folder)
    if hit is None:
        raise KeyError(f"{Path(folder).name!r} is not a released feature folder (presets: {', '.join(RELEASED)})")
    base, p = hit
    params = {"source": "Emotion-LLaMA authors' released features", "release": p.release, "folder": base,
              "description": p.description}
    params.update(overrides.pop("params", None) or {})
    kw: dict[str, Any] = dict(name=p.name(base), modality=p.modality, encoder=f"released:{base}",
                              weights=f"authors:{base}", layer=p.layer, pooling="mean", shape=(1024,), dtype=dtype)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return FeatureSpec(params=params, **kw)


def storage_dtype(requested: str, source: np.dtype | str) -> tuple[str, str | None]:
    """The dtype to store, and a note when it differs from the source's.

    ``requested`` "keep" (the import default): float16 and float32 stay as they are; float64 and other
    numeric types become float32 (noted). Anything else is a dtype name used as it is (noted when it
    narrows a float source, e.g. float32 -> float16)."""
    src = np.dtype(source)
    if requested == "keep":
        if src in (np.float16, np.float32):
            return src.name, None
        return "float32", f"source dtype {src.name} stored as float32"
    want = np.dtype(requested)
    if np.issubdtype(src, np.floating) and np.issubdtype(want, np.floating) and want.itemsize < src.itemsize:
        return want.name, f"source dtype {src.name} stored as {want.name} (rounded)"
    return want.name, None


def first_npy(folder: str | Path) -> np.ndarray:
    """The first ``*.npy`` of a folder (sorted by name), memory-mapped: its shape and dtype describe
    the folder. Raises FileNotFoundError when there is none."""
    folder = Path(folder)
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"no .npy files in {folder} (expected one <clip_id>.npy per clip)")
    return np.load(files[0], mmap_mode="r", allow_pickle=False)


class ImportResult(dict):
    """{"key": set key, "imported": n, "skipped": n already complete}"""


class NonFiniteError(ValueError):
    """An imported clip holds NaN or Inf (or overflows the storage dtype); the message names its file."""


class ExportExistsError(FileExistsError):
    """The export's destination exists (pass force to replace it)."""


def non_finite(x: np.ndarray, dtype: str | np.dtype) -> str | None:
    """What is not finite in ``x`` once stored as ``dtype``, in words ("3 NaN", "2 values beyond float16's
    range (max 65504)"); None when every value is finite (and for integer data)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return None
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(x)))
        return ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (bad - nan, "Inf")) if n) + f" of {x.size} values"
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.floating) and dt.itemsize < x.dtype.itemsize:
        with np.errstate(over="ignore"):
            over = int(x.size - np.count_nonzero(np.isfinite(x.astype(dt))))
        if over:
            return f"{over} value(s) beyond {dt.name}'s range (max {float(np.finfo(dt).max):g}), which become Inf"
    return None


def _fit(spec: FeatureSpec, clip: str, x: np.ndarray, source: str = "") -> np.ndarray:
    """Accept singleton leading dims around the declared shape (e.g. (1, 1024) for (1024,)); refuse
    values that are not finite as stored."""
    x = np.asarray(x)
    while x.ndim > len(spec.shape) and x.shape[0] == 1:
        x = x[0]
    why = non_finite(x, spec.dtype)
    if why:
        raise NonFiniteError(f"{source or clip}: {why} (set {spec.name}, stored as {spec.dtype}); nothing of this clip "
                             "was imported: fix or leave out the file (clips before it are kept; a rerun skips them)"
                             + (", or import as --dtype float32" if "range" in why else ""))
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
        try:
            w.add(clip, {key: _fit(spec, clip, x, rec.get("imported_from", ""))}, rec)
        except NonFiniteError:
            w.commit()   # the clips before it are good: keep them
            raise
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


def import_released(store: FeatureStore, folder: str | Path, *, dtype: str = "keep", config: dict | None = None,
                    batch: int = BATCH, **overrides: Any) -> ImportResult:
    """Import one of the authors' released feature folders (``.../MER2023/mae_340_UTT``, ...) with its
    preset spec (:func:`released_spec`; ``overrides`` replace spec fields). ``dtype`` "keep" stores the
    files' own precision (float64 as float32, noted in the set's config as ``source_dtype``)."""
    first = first_npy(folder)
    store_dtype, note = storage_dtype(dtype, first.dtype)
    spec = released_spec(folder, dtype=store_dtype, **overrides)
    if note:
        log.warning("%s: %s", Path(folder).name, note)
    cfg = {"source_dtype": first.dtype.name, **({"dtype_note": note} if note else {}), **(config or {})}
    return import_npy_folder(store, folder, spec, config=cfg, batch=batch)


def import_hdf5(store: FeatureStore, path: str | Path, spec: FeatureSpec, dataset_path: str | None = None, *,
                config: dict | None = None, batch: int = BATCH) -> ImportResult:
    """Import an HDF5 file holding one dataset per clip (named by clip id) under a group
    (``dataset_path``, default the file's root)."""
    import h5py   # optional: only for HDF5 imports and exports

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
                batch: int = BATCH, force: bool = False) -> int:
    """Write ``/<set key>/<clip id>`` datasets (stored dtype) with the spec in each group's attrs, into a
    temporary file renamed to ``path`` when complete. An existing ``path`` is replaced only with
    ``force`` (ExportExistsError). Returns the number of datasets written."""
    import h5py   # optional: only for HDF5 imports and exports

    path = Path(path)
    if path.is_dir():
        raise ExportExistsError(f"{path} is a folder: name an HDF5 file to export to")
    if path.exists() and not force:
        raise ExportExistsError(f"{path} exists: pass --force to replace it, or name another file")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with h5py.File(tmp, "w") as f:
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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def export_npy(store: FeatureStore, key: str, folder: str | Path, *, clip_ids: Sequence[str] | None = None,
               batch: int = BATCH, force: bool = False) -> int:
    """Write ``folder/<clip id>.npy`` (stored dtype) and ``folder/spec.json``. A folder that holds files
    already is written into only with ``force`` (ExportExistsError). Returns the clip count."""
    key = store.resolve(key)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportExistsError(f"{folder} is a file: name a folder to export npy files to")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ExportExistsError(f"{folder} is not empty: pass --force to write into it (files of the same name are "
                                "replaced), or name a new folder")
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

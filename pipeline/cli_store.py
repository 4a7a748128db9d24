"""`emollama store ...`: look into, check, import into, export from, and tidy a feature store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

store_app = typer.Typer(
    help="Inspect and manage a feature store (a local directory or an fsspec URL such as s3://bucket/prefix).",
    no_args_is_help=True,
)

STORE = typer.Argument(..., help="Store location: a directory or an fsspec URL (s3://bucket/prefix).")


def _open(url: str, create: bool = False):
    from store import FeatureStore

    try:
        return FeatureStore.open(url, create=create)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@store_app.command("ls")
def ls(url: str = STORE) -> None:
    """List the feature sets, one line each: key, clips, shape, dtype."""
    st = _open(url)
    for s in st.info()["sets"]:
        shape = "x".join(str(d) for d in s["shape"])
        typer.echo(f"{s['key']}\t{s['clips']} clips\t[{shape}] {s['dtype']}\t{s['modality']}/{s['encoder']}")


@store_app.command("info")
def info(url: str = STORE, as_json: bool = typer.Option(False, "--json", help="Print the same as JSON.")) -> None:
    """Sets, clips, bytes, files and failures of a store."""
    st = _open(url)
    d = st.info()
    if as_json:
        typer.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    typer.echo(f"store    {d['url']}")
    typer.echo(f"clips    {d['clips']}  (failures: {d['failures']})")
    typer.echo(f"size     {_mb(d['bytes'])} in {d['files']} files, {d['segments']} segments")
    for s in d["sets"]:
        shape = "x".join(str(x) for x in s["shape"])
        typer.echo(f"  {s['key']:<40} {s['clips']:>8} clips  [{shape}] {s['dtype']}  {_mb(s['bytes'])}")
    for clip, reason in sorted(d["failed"].items())[:20]:
        typer.echo(f"  failed {clip}: {reason}")
    if d["failures"] > 20:
        typer.echo(f"  ... and {d['failures'] - 20} more failures (--json lists them all)")


@store_app.command("verify")
def verify(url: str = STORE, shallow: bool = typer.Option(False, "--shallow", help="Skip decoding every chunk.")) -> None:
    """Check every chunk decodes and every complete clip has every set; exit 1 on any problem."""
    st = _open(url)
    report = st.verify(deep=not shallow)
    typer.echo(str(report))
    if report.orphans:
        typer.echo(f"({len(report.orphans)} uncommitted segment(s) are invisible to readers; `compact` removes old ones)")
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("import")
def import_(
    url: str = STORE,
    src: Path = typer.Argument(..., help="A folder of <clip>.npy files, or an HDF5 file (one dataset per clip)."),
    name: str = typer.Option(..., "--name", help="Readable set name, e.g. audio.hubert.utt"),
    encoder: str = typer.Option(..., "--encoder", help="Encoder that made the features, e.g. hubert"),
    modality: str = typer.Option(..., "--modality", help="audio | local | temporal | global | ..."),
    weights: str = typer.Option("unknown", "--weights", help="Weights identity, e.g. sha256:<hex> or hub:<id>@<rev>"),
    layer: str = typer.Option("unknown", "--layer", help="Layer the features come from"),
    pooling: str = typer.Option("unknown", "--pooling", help="Pooling, e.g. mean | none"),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16 | float32"),
    fmt: Optional[str] = typer.Option(None, "--format", help="npy | hdf5 (default: from SRC)"),
    dataset_path: Optional[str] = typer.Option(None, "--dataset-path", help="HDF5 group holding the clips"),
    param: List[str] = typer.Option([], "--param", help="Extra spec params KEY=VALUE (repeatable)"),
    fixed: bool = typer.Option(False, "--fixed", help="Keep a 2-D per-clip shape fixed (default: [T, D] is variable)"),
) -> None:
    """Import features made elsewhere, declaring what they are (the shape is read from the first clip)."""
    import numpy as np

    from store import FeatureSpec
    from store.interop import import_hdf5, import_npy_folder

    fmt = fmt or ("npy" if src.is_dir() else "hdf5")
    if fmt not in ("npy", "hdf5"):
        typer.echo("error: --format must be npy or hdf5", err=True)
        raise typer.Exit(2)
    if not src.exists():
        typer.echo(f"error: {src} does not exist", err=True)
        raise typer.Exit(2)
    first = _first_array_shape(src, fmt, dataset_path)
    shape: tuple = tuple(first)
    if fmt == "npy" and len(shape) == 2 and shape[0] == 1:
        shape = shape[1:]
    params = dict(p.split("=", 1) for p in param)
    if len(shape) == 2 and shape[0] != 1 and not fixed:
        shape = (None, shape[1])  # [T, D] per clip: variable length
    spec = FeatureSpec(name=name, modality=modality, encoder=encoder, weights=weights, layer=layer,
                       pooling=pooling, shape=shape, dtype=str(np.dtype(dtype)), params=params)
    st = _open(str(url), create=True)
    try:
        if fmt == "npy":
            res = import_npy_folder(st, src, spec)
        else:
            res = import_hdf5(st, src, spec, dataset_path)
    except (ValueError, KeyError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{res['key']}: imported {res['imported']} clips ({res['skipped']} already there)")


def _first_array_shape(src: Path, fmt: str, dataset_path: Optional[str]) -> tuple:
    import numpy as np

    if fmt == "npy":
        files = sorted(src.glob("*.npy"))
        if not files:
            typer.echo(f"error: no .npy files in {src}", err=True)
            raise typer.Exit(2)
        return np.load(files[0], mmap_mode="r").shape
    import h5py

    with h5py.File(src, "r") as f:
        g = f[dataset_path] if dataset_path else f
        for v in g.values():
            if isinstance(v, h5py.Dataset):
                return v.shape
    typer.echo(f"error: no datasets in {src}:{dataset_path or '/'}", err=True)
    raise typer.Exit(2)


@store_app.command("export")
def export(
    url: str = STORE,
    dest: Path = typer.Argument(..., help="HDF5 file, or folder for npy (one folder per set when several)."),
    sets: List[str] = typer.Option(..., "--set", help="Set name or key (repeatable)."),
    fmt: str = typer.Option("hdf5", "--format", help="hdf5 | npy"),
) -> None:
    """Export sets to one HDF5 file (/<key>/<clip>) or to npy folders (<clip>.npy)."""
    from store.interop import export_hdf5, export_npy

    st = _open(url)
    try:
        keys = [st.resolve(s) for s in sets]
    except KeyError as e:
        typer.echo(f"error: {e.args[0]}", err=True)
        raise typer.Exit(2)
    if fmt == "hdf5":
        n = export_hdf5(st, keys, dest)
    elif fmt == "npy":
        n = 0
        for k in keys:
            n += export_npy(st, k, dest if len(keys) == 1 else dest / k)
    else:
        typer.echo("error: --format must be hdf5 or npy", err=True)
        raise typer.Exit(2)
    typer.echo(f"exported {n} arrays to {dest}")


@store_app.command("rm")
def rm(
    url: str = STORE,
    clips: List[str] = typer.Option(..., "--clip", help="Clip id (repeatable)."),
    sets: List[str] = typer.Option([], "--set", help="Only from these sets (default: every set and the clip record)."),
) -> None:
    """Remove clips' features (a rerun of extraction recomputes them)."""
    st = _open(url)
    try:
        n = st.remove(clips, sets or None)
    except KeyError as e:
        typer.echo(f"error: {e.args[0]}", err=True)
        raise typer.Exit(2)
    typer.echo(f"removed {n} clip(s)")


@store_app.command("compact")
def compact(
    url: str = STORE,
    full: bool = typer.Option(False, "--full", help="Also rewrite earlier compacted segments."),
    keep: float = typer.Option(0.0, "--keep", min=0.0,
                               help="Seconds to keep merged segments for readers that opened the store before "
                                    "(a running training job); a later compact deletes them."),
) -> None:
    """Merge small segments into large sharded ones and drop removed or duplicate rows."""
    st = _open(url)
    r = st.compact(full=full, keep_s=keep)
    typer.echo(f"compacted {r['compacted']} segments: files {r['files_before']} -> {r['files_after']}, "
               f"segments {r['segments_before']} -> {r['segments_after']}")

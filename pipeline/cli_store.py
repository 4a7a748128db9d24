"""`emollama store ...`: look into, check, import into, export from, compare and tidy a feature store.

``import`` recognises the authors' released feature folders (``mae_340_UTT``, ``maeV_399_UTT``,
``HL-UTT`` and MER2024's ``*_23_*``; presets in :mod:`store.interop`) and keeps the files' precision by
default; ``compare`` reports per-clip cosine similarity between two sets (:mod:`store.compare`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

store_app = typer.Typer(
    help="Inspect and manage a feature store (a local directory or an fsspec URL such as s3://bucket/prefix).",
    no_args_is_help=True,
    rich_markup_mode=None,   # plain help: Rich markup would eat "[...]"
)

STORE = typer.Argument(..., help="Store location: a directory or an fsspec URL (s3://bucket/prefix).")


STORAGE_EXIT = 4  # the store is not writable, the disk is full, or the store is damaged beyond the command


def _open(url: str, create: bool = False):
    from emollama.store import FeatureStore

    try:
        with _storage_errors(f"opening {url}"):
            return FeatureStore.open(url, create=create)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@contextmanager
def _storage_errors(doing: str):
    """A storage failure (disk full, read-only store) as one line on stderr and exit status 4."""
    from emollama.store import StorageError

    try:
        yield
    except StorageError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(STORAGE_EXIT)
    except (FileNotFoundError, FileExistsError):
        raise
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        typer.echo(f"error: storage error while {doing}: {e.strerror or e}{where}; nothing committed was lost: "
                   "fix the cause (free space, permissions) and rerun", err=True)
        raise typer.Exit(STORAGE_EXIT)


def _damaged(st) -> None:
    """A line on stderr when commit marks are damaged (their clips are hidden)."""
    bad = st.damaged_marks
    if bad:
        typer.echo(f"warning: {len(bad)} damaged commit mark(s) hide their clips: run `emollama store repair "
                   f"{st.url}`", err=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@store_app.command("ls")
def ls(url: str = STORE) -> None:
    """List the feature sets, one line each: key, clips, shape, dtype."""
    st = _open(url)
    for s in st.info()["sets"]:
        shape = "x".join(str(d) for d in s["shape"])
        typer.echo(f"{s['key']}\t{s['clips']} clips\t[{shape}] {s['dtype']}\t{s['modality']}/{s['encoder']}")
    _damaged(st)


def face_summary(records: dict[str, dict]) -> dict:
    """The faces of the extracted clips, from their records (extract.step.use_track): how many clips
    have a face record, which have no face, a weak track (extract.faces.is_weak: the main face absent in
    more than WEAK_ABSENT of the anchor frames) or several shots. `without_counts`: clips extracted
    before the records held the counts (re-extract them to know)."""
    from emollama.extract.faces import WEAK_ABSENT, is_weak

    ok = {c: r for c, r in records.items() if r.get("status") == "ok" and "face_found" in r}
    counted = {c: r for c, r in ok.items() if "face_detected" in r}
    return {"clips": len(ok), "no_face": sorted(c for c, r in ok.items() if not r["face_found"]),
            "weak_track": sorted(c for c, r in counted.items() if r["face_found"] and is_weak(
                r["face_detected"], r["face_interpolated"], r["face_absent"])),
            "several_shots": sorted(c for c, r in counted.items() if r.get("shots", 1) > 1),
            "without_counts": len(ok) - len(counted), "weak_absent": WEAK_ABSENT}


def _some(ids: list[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f" ... (+{len(ids) - n}, --json lists them all)" if len(ids) > n else "")


@store_app.command("info")
def info(url: str = STORE, as_json: bool = typer.Option(False, "--json", help="Print the same as JSON.")) -> None:
    """Sets (with the profile that made each: paper, tiny, or imported), clips, bytes, files and
    failures of a store, and the faces of its clips (no face, a weak track, several shots)."""
    from emollama.store import profile_summary

    st = _open(url)
    d = st.info()
    d["faces"] = face_summary(st.records())
    if as_json:
        typer.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    typer.echo(f"store    {d['url']}")
    typer.echo(f"clips    {d['clips']}  (failures: {d['failures']})")
    typer.echo(f"size     {_mb(d['bytes'])} in {d['files']} files, {d['segments']} segments")
    typer.echo(f"profile  {profile_summary({s['key']: s['profile'] for s in d['sets']}, note=True)}")
    if d["damaged_marks"]:
        typer.echo(f"damaged  {len(d['damaged_marks'])} commit mark(s) hide their clips; "
                   f"`emollama store repair {d['url']}` rebuilds them")
        for why in sorted(d["damaged_marks"].values()):
            typer.echo(f"  {why}")
    specs = st.sets()
    for s in d["sets"]:
        shape = "x".join(str(x) for x in s["shape"])
        # a perturbed set (eval --conditions: [extract.perturb]) says so beside its profile
        pert = (specs[s["key"]].params or {}).get("perturb") if s["key"] in specs else None
        typer.echo(f"  {s['key']:<40} {s['clips']:>8} clips  [{shape}] {s['dtype']}  {_mb(s['bytes'])}  "
                   f"{s['profile']}" + ("  perturbed: " + ", ".join(f"{k}={v:g}" for k, v in pert.items())
                                        if pert else ""))
    f = d["faces"]
    if f["clips"]:
        typer.echo(f"faces    {f['clips']} clips: {len(f['no_face'])} with no face (whole frames used), "
                   f"{len(f['weak_track'])} with a weak track (the main face absent in more than "
                   f"{f['weak_absent']:.0%} of the frames), {len(f['several_shots'])} with several shots"
                   + (f"; {f['without_counts']} extracted before the counts were recorded" if f["without_counts"] else ""))
        for what, key in (("no face", "no_face"), ("weak track", "weak_track"), ("several shots", "several_shots")):
            if f[key]:
                typer.echo(f"  {what}: {_some(f[key])}")
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
    if st.damaged_marks:
        typer.echo(f"run `emollama store repair {st.url}` to rebuild the damaged commit mark(s)")
    if not report.ok:
        raise typer.Exit(1)


@store_app.command("repair")
def repair(url: str = STORE, shallow: bool = typer.Option(False, "--shallow", help="Skip decoding every chunk.")) -> None:
    """Rebuild damaged commit marks: from their copy, else from the segment data (the clips come back);
    clips whose data is lost are marked for recompute (a rerun of extraction redoes them). Nothing is deleted.

    Exit 0 when the store verifies clean afterwards, 1 when problems remain (listed), 4 on a storage error."""
    st = _open(url)
    with _storage_errors(f"repairing {url}"):
        r = st.repair(deep=not shallow)
    if not r["marks"] and not r["recompute"]:
        typer.echo("no damaged commit marks")
    for seg, how in sorted(r["marks"].items()):
        typer.echo(f"commit mark {seg}: {how}")
    if r["marks"]:
        typer.echo(f"{r['recovered_clips']} clip(s) recovered from {len(r['marks'])} damaged mark(s)"
                   f"{'; damaged marks kept in _commits/.damaged' if r['marks'] else ''}")
    for p in r["unrecovered"]:
        typer.echo(f"kept, not readable: {p}")
    if r["recompute"]:
        more = f" ... (+{len(r['recompute']) - 10})" if len(r["recompute"]) > 10 else ""
        typer.echo(f"{len(r['recompute'])} clip(s) marked for recompute (a rerun of extraction redoes them): "
                   f"{', '.join(r['recompute'][:10])}{more}")
    if r["ok"]:
        typer.echo("store OK")
    else:
        typer.echo(f"store still has {len(r['problems'])} problem(s) repair does not fix:")
        for p in r["problems"]:
            typer.echo(f"  - {p}")
        raise typer.Exit(1)


@store_app.command("import")
def import_(
    url: str = STORE,
    src: Path = typer.Argument(..., help="A folder of <clip>.npy files, or an HDF5 file (one dataset per clip). "
                                         "The authors' released folders (mae_340_UTT, maeV_399_UTT, HL-UTT, "
                                         "mae_340_23_UTT, maeVideo_399_23_UTT, HL_23_UTT) need no other flag."),
    name: Optional[str] = typer.Option(None, "--name", help="Readable set name, e.g. audio.hubert.utt "
                                                             "(required unless SRC is a released folder)"),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder that made the features, e.g. hubert "
                                                                  "(required unless SRC is a released folder)"),
    modality: Optional[str] = typer.Option(None, "--modality", help="audio | local | temporal | global | ... "
                                                                    "(required unless SRC is a released folder)"),
    weights: Optional[str] = typer.Option(None, "--weights",
                                          help="Weights identity, e.g. sha256:<hex> or hub:<id>@<rev> "
                                               "[default: unknown, or the preset's]"),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer the features come from "
                                                              "[default: unknown, or the preset's]"),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Pooling, e.g. mean | none "
                                                                  "[default: unknown, or the preset's]"),
    dtype: str = typer.Option("keep", "--dtype", help="Storage dtype: keep (the files' own: float16/float32 as "
                                                      "they are, float64 as float32) | float16 | float32"),
    fmt: Optional[str] = typer.Option(None, "--format", help="npy | hdf5 (default: from SRC)"),
    dataset_path: Optional[str] = typer.Option(None, "--dataset-path", help="HDF5 group holding the clips"),
    param: List[str] = typer.Option([], "--param", help="Extra spec params KEY=VALUE (repeatable)"),
    fixed: bool = typer.Option(False, "--fixed", help="Keep a 2-D per-clip shape fixed (default: [T, D] is variable)"),
) -> None:
    """Import features made elsewhere, declaring what they are (the shape is read from the first clip).

    The authors' released folders need no flags: their presets give the name, modality, encoder, shape and params.

    Flags override a preset. --dtype keep (the default) stores float16/float32 files bit for bit."""
    from emollama.store import FeatureSpec
    from emollama.store.interop import (RELEASED, import_hdf5, import_npy_folder, released_preset, released_spec,
                               storage_dtype)

    if not src.exists():
        typer.echo(f"error: {src} does not exist", err=True)
        raise typer.Exit(2)
    fmt = fmt or ("npy" if src.is_dir() else "hdf5")
    if fmt not in ("npy", "hdf5"):
        typer.echo("error: --format must be npy or hdf5", err=True)
        raise typer.Exit(2)
    if dtype != "keep":
        import numpy as np

        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            typer.echo(f"error: --dtype must be keep, float16 or float32, got {dtype!r}", err=True)
            raise typer.Exit(2)
    preset = released_preset(src) if fmt == "npy" else None
    first_shape, first_dtype = _first_array(src, fmt, dataset_path)
    store_dtype, note = storage_dtype(dtype, first_dtype)
    params = dict(p.split("=", 1) for p in param)
    if preset is not None:
        spec = released_spec(src, dtype=store_dtype, name=name, encoder=encoder, modality=modality, weights=weights,
                             layer=layer, pooling=pooling, params=params)
        typer.echo(f"{src.name}: released {preset[1].release} features ({preset[1].modality}) -> {spec.name}")
    else:
        missing = [f for f, v in (("--name", name), ("--encoder", encoder), ("--modality", modality)) if not v]
        if missing:
            typer.echo(f"error: {src.name!r} is not a released feature folder, so pass {', '.join(missing)} to say "
                       f"what it holds (and optionally --weights, --layer, --pooling, --param KEY=VALUE). "
                       f"Folders recognised without flags: {', '.join(RELEASED)}", err=True)
            raise typer.Exit(2)
        shape: tuple = tuple(first_shape)
        if fmt == "npy" and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) == 2 and shape[0] != 1 and not fixed:
            shape = (None, shape[1])  # [T, D] per clip: variable length
        spec = FeatureSpec(name=name, modality=modality, encoder=encoder, weights=weights or "unknown",
                           layer=layer or "unknown", pooling=pooling or "unknown", shape=shape, dtype=store_dtype,
                           params=params)
    if note:
        typer.echo(f"note: {note}")
    config = {"source_dtype": first_dtype.name, **({"dtype_note": note} if note else {})}
    st = _open(str(url), create=True)
    try:
        with _storage_errors(f"importing into {url}"):
            if fmt == "npy":
                res = import_npy_folder(st, src, spec, config=config)
            else:
                res = import_hdf5(st, src, spec, dataset_path, config=config)
    except (ValueError, KeyError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{res['key']}: imported {res['imported']} clips ({res['skipped']} already there) as {spec.dtype}")


def _first_array(src: Path, fmt: str, dataset_path: Optional[str]) -> tuple:
    """(shape, dtype) of the first clip in SRC."""
    import numpy as np

    if fmt == "npy":
        files = sorted(src.glob("*.npy"))
        if not files:
            typer.echo(f"error: no .npy files in {src}", err=True)
            raise typer.Exit(2)
        a = np.load(files[0], mmap_mode="r")
        return a.shape, a.dtype
    import h5py

    with h5py.File(src, "r") as f:
        g = f[dataset_path] if dataset_path else f
        for v in g.values():
            if isinstance(v, h5py.Dataset):
                return v.shape, v.dtype
    typer.echo(f"error: no datasets in {src}:{dataset_path or '/'}", err=True)
    raise typer.Exit(2)


@store_app.command("compare")
def compare(
    url: str = STORE,
    set_a: str = typer.Argument(..., help="Set name or key in STORE, e.g. local.vit_mae.mean"),
    set_b: str = typer.Argument(..., help="Set name or key (in STORE, or in --store-b), "
                                          "e.g. local.mae_340_utt.released"),
    store_b: Optional[str] = typer.Option(None, "--store-b", help="Read SET_B from this store instead of STORE."),
    worst: int = typer.Option(10, "--worst", min=0, help="List the K clips with the lowest cosine."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """How close two feature sets are: per-clip cosine over their common complete clips.

    Clips are compared as flattened float32 vectors (variable-length sets averaged over time first).

    Prints the clip counts (common, only in A, only in B), the min/median/mean cosine and the K worst clips."""
    from emollama.store.compare import compare_sets, format_comparison

    sta = _open(url)
    stb = _open(store_b) if store_b else sta
    try:
        r = compare_sets(sta, set_a, stb, set_b, worst=worst)
    except KeyError as e:
        typer.echo(f"error: {e.args[0]}", err=True)
        raise typer.Exit(2)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(r, indent=2, sort_keys=True) if as_json else format_comparison(r))


@store_app.command("export")
def export(
    url: str = STORE,
    dest: Path = typer.Argument(..., help="HDF5 file, or folder for npy (one folder per set when several)."),
    sets: List[str] = typer.Option(..., "--set", help="Set name or key (repeatable)."),
    fmt: str = typer.Option("hdf5", "--format", help="hdf5 | npy"),
    force: bool = typer.Option(False, "--force", help="Replace an existing file (npy: write into a folder that "
                               "holds files)."),
) -> None:
    """Export sets to one HDF5 file (/<key>/<clip>) or to npy folders (<clip>.npy).

    An existing DEST is never replaced without --force (exit 2)."""
    from emollama.store.interop import ExportExistsError, export_hdf5, export_npy

    if fmt not in ("hdf5", "npy"):
        typer.echo("error: --format must be hdf5 or npy", err=True)
        raise typer.Exit(2)
    st = _open(url)
    try:
        keys = [st.resolve(s) for s in sets]
    except KeyError as e:
        typer.echo(f"error: {e.args[0]}", err=True)
        raise typer.Exit(2)
    try:
        with _storage_errors(f"exporting to {dest}"):
            if fmt == "hdf5":
                n = export_hdf5(st, keys, dest, force=force)
            else:
                folders = [dest if len(keys) == 1 else dest / k for k in keys]
                n = sum(export_npy(st, k, d, force=force) for k, d in zip(keys, folders))
    except ExportExistsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"exported {n} arrays to {dest}")


@store_app.command("rm")
def rm(
    url: str = STORE,
    clips: List[str] = typer.Option(..., "--clip", help="Clip id (repeatable)."),
    sets: List[str] = typer.Option([], "--set", help="Only from these sets (default: every set and the clip record)."),
) -> None:
    """Remove clips' features (a rerun of extraction recomputes them).

    A clip id the store does not know (in the --set sets, when given) removes nothing: exit 2, naming it."""
    st = _open(url)
    try:
        known = set().union(*(st.complete(k) for k in sets)) if sets else st.clips()
    except KeyError as e:
        typer.echo(f"error: {e.args[0]}", err=True)
        raise typer.Exit(2)
    unknown = [c for c in dict.fromkeys(clips) if c not in known]
    if unknown:
        from difflib import get_close_matches

        where = f"in {', '.join(sets)} of" if sets else "in"
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        near = get_close_matches(unknown[0], sorted(known), n=3)
        typer.echo(f"error: no clip {', '.join(map(repr, unknown[:5]))}{more} {where} {url}: nothing removed"
                   + (f" (did you mean {', '.join(map(repr, near))}?)" if near else f" ({len(known)} clips there)"),
                   err=True)
        raise typer.Exit(2)
    with _storage_errors(f"removing clips from {url}"):
        n = st.remove(clips, sets or None)
    typer.echo(f"removed {n} clip(s)")


@store_app.command("compact")
def compact(
    url: str = STORE,
    full: bool = typer.Option(False, "--full", help="Also rewrite earlier compacted segments."),
    keep: float = typer.Option(0.0, "--keep", min=0.0,
                               help="Seconds to keep merged segments for readers that opened the store before "
                                    "(a running training job); a later compact deletes them."),
) -> None:
    """Merge small segments into large sharded ones and drop removed or duplicate rows.

    Prints what it did: segments merged, merged segments deleted (also those an earlier compaction kept),
    orphaned data deleted, files removed and written, bytes freed. Exit 4 (one line) when the disk is full
    or the store is not writable: the store is left as it was."""
    st = _open(url)
    with _storage_errors(f"compacting {url}"):
        r = st.compact(full=full, keep_s=keep)
    merged = (f"merged {r['compacted']} segments into {r['segments_written']}" if r["compacted"]
              else "nothing to merge")
    typer.echo(f"compact: {merged}; deleted {r['merged_deleted']} merged segment(s) and {r['orphans_deleted']} "
               f"orphaned one(s); files {r['files_before']} -> {r['files_after']} ({r['files_removed']} removed, "
               f"{r['files_written']} written), {_mb(max(r['bytes_freed'], 0))} freed"
               + (f" ({_mb(-r['bytes_freed'])} more used until the merged segments are deleted)"
                  if r["bytes_freed"] < 0 else "")
               + f"; segments {r['segments_before']} -> {r['segments_after']}")

"""Checkpoints, written atomically, loaded only through safetensors or ``torch.load(weights_only=True)``.

    <run>/adapter/                     PEFT's own format (adapter_config.json + adapter_model.safetensors):
                                       ``peft.PeftModel.from_pretrained(base, <run>/adapter)`` loads it
    <run>/projectors.safetensors       one projector per feature set (``<name>.weight``, ``<name>.bias``,
                                       ``<name>.feature_mean``, ``<name>.feature_std``)
    <run>/projectors.json              their config (set key, part, shapes, grouping) and the prompt layout
    <run>/config.json                  the resolved training config
    <run>/feature_sets.json            the store's feature-set keys and specs the run read
    <run>/versions.json                package versions
    <run>/subtitles.json               where the subtitles came from (train.subtitles: the ASR text set read)
    <run>/checkpoints/step-000123/     everything needed for an exact resume: the adapter, projectors,
                                       optimizer.pt, rng.pt and state.json (step, epoch, data position,
                                       scheduler, loss history)

Weights are loaded only when every tensor is finite (``check_finite``: NaN or Inf is refused with the
tensor's name), so no run, ``--init-from`` or ``--resume`` starts from a diverged checkpoint. Every
folder is built under a temporary name in the same parent and renamed into place, so a crash never
leaves a half-written checkpoint; the newest ``step-*`` folder is always complete. A save that
cannot be written (disk full, quota, read-only) removes its temporary files and raises
``CheckpointWriteError`` naming the folder, the free space and the last complete checkpoint, which
stays untouched (``emollama train`` exits 4; ``--resume`` continues from it once there is room).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PROJECTORS = "projectors.safetensors"
PROJECTORS_JSON = "projectors.json"
STEP_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or not in a safe format."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, read-only); the last complete one is intact."""

    def __init__(self, message: str, last: Path | None = None) -> None:
        super().__init__(message)
        self.last = last


FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def run_write_failed(e: OSError, run: Path) -> bool:
    """``e`` is a failed write of the run folder: a full disk, a quota, a read-only file system, or a
    permission refused on a path inside ``run``."""
    if e.errno in FULL_ERRNOS:
        return True
    if e.errno in (errno.EACCES, errno.EPERM) and getattr(e, "filename", None):
        try:
            Path(e.filename).resolve().relative_to(Path(run).resolve())
            return True
        except (ValueError, OSError):
            return False
    return False


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _free(path: Path) -> str:
    try:
        return _human(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"


def _tree_bytes(path: Path | None) -> int:
    if path is None:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def write_failure(run: Path, what: str, error: BaseException) -> CheckpointWriteError:
    """One line: what could not be written where, why, the free space there, the last complete
    checkpoint (untouched) and what to do."""
    run = Path(run)
    last = latest_checkpoint(run)
    need = _tree_bytes(last)
    text = str(error)
    if isinstance(error, OSError) and error.errno:
        why = os.strerror(error.errno)
    elif "No space left" in text or "os error 28" in text:   # safetensors: "I/O error: No space left ..."
        why = os.strerror(errno.ENOSPC)
    else:   # torch.save wraps the OS error in its own ("PytorchStreamWriter failed writing file ...")
        first = (text.strip().splitlines() or [type(error).__name__])[-1].strip()
        why = f"write failed ({first[:160]})"
        try:
            if need and shutil.disk_usage(run).free < need:
                why = f"the disk is full: {why}"
        except OSError:
            pass
    room = f"{_free(run)} free there" + (f", a checkpoint takes about {_human(need)}" if need else "")
    kept = (f"the last complete checkpoint {last} is intact and nothing committed was lost"
            if last is not None else "no checkpoint had been written yet")
    return CheckpointWriteError(f"cannot write {what} in {run}: {why} ({room}); {kept}. Free some space (or pick "
                                f"a writable --out) and rerun with --resume.", last)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("emollama", "torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_json(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Write JSON atomically (a temporary file, then rename); a failed write leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)     # never leave a partial temp file behind (a full disk stays as full)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` at ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_projectors(projectors, folder: Path, meta: Mapping[str, Any]) -> None:
    tensors = {f"{name}.{p}": t.detach().to("cpu").contiguous().clone()
               for name, layer in projectors.layers.items() for p, t in layer.saved_state().items()}
    save_file(tensors, str(folder / PROJECTORS), metadata={"format": "pt"})
    write_json(folder / PROJECTORS_JSON, dict(meta))


def check_finite(tensors: Mapping[str, Any], source: str | Path) -> None:
    """CheckpointError naming the first floating tensor of ``tensors`` that holds NaN or Inf."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
            raise CheckpointError(f"{source}: tensor {name} holds {what} of {t.numel()} values; refusing to load it "
                                  "(a diverged or damaged checkpoint: use an earlier one)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; CheckpointError when it is not one, or holds NaN or Inf."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}); refusing to load it "
                              "(only safetensors checkpoints are accepted, never pickles)") from None
    check_finite(state, path)
    return state


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, AttributeError, TypeError) as e:   # weights_only refused what it holds
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        why = ([ln for ln in lines if "GLOBAL" in ln] or lines or [type(e).__name__])[0]
        raise CheckpointError(f"{path} holds something other than tensors and plain data; refusing to load it "
                              f"(weights_only=True): {why}") from None
    except (RuntimeError, EOFError, IndexError, OSError) as e:   # a zip without its directory, a record past the end
        raise damaged_file(path, e) from None


def damaged_file(path: Path, e: BaseException) -> CheckpointError:
    """One line for a checkpoint file torch cannot read: truncated (an interrupted copy or download) or
    corrupt; its size and torch's first sentence."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    why = lines[0].split(". ")[0] if lines else type(e).__name__
    try:
        size = f"{path.stat().st_size:,} bytes"
    except OSError:
        size = "size unknown"
    return CheckpointError(f"{path} is truncated or corrupt ({size}; torch cannot read it: {why}): copy or "
                           "download it again")


def _role_names(projectors, folder: Path) -> dict[str, str]:
    """{our projector: the folder's projector of the same role (modality, part)} where names differ and
    each role is held by one projector on both sides (e.g. an imported run's ``local_vit_mae_mean``
    feeding a run that reads ``local.mae_340_utt.released``)."""
    try:
        theirs = json.loads((folder / PROJECTORS_JSON).read_text())["projectors"]
    except (OSError, ValueError, KeyError):
        return {}
    by_role: dict[tuple, list[str]] = {}
    for p in theirs:
        by_role.setdefault((p["modality"], p["part"]), []).append(p["name"])
    ours: dict[tuple, list[str]] = {}
    for p in projectors.specs.values():
        ours.setdefault((p.modality, p.part), []).append(p.name)
    return {o[0]: t[0] for role, t in by_role.items() if len(t) == 1 and len(o := ours.get(role, [])) == 1}


def load_projectors(projectors, folder: Path, *, by_role: bool = False) -> None:
    """Load ``folder``'s projectors by name; with ``by_role``, a projector missing by name is taken from
    the folder's one projector of the same modality and part (starting from another run)."""
    state = load_safetensors(folder / PROJECTORS)
    roles = _role_names(projectors, folder) if by_role else {}
    for name, layer in projectors.layers.items():
        sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == name}
        if not sub and name in roles:
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == roles[name]}
        if not sub:
            raise CheckpointError(f"{folder / PROJECTORS} has no projector {name!r} "
                                  f"(it holds {sorted({k.split('.')[0] for k in state})}); "
                                  "was it trained on other feature sets?")
        try:
            layer.load_saved(sub)
        except ValueError as e:
            raise CheckpointError(f"projector {name!r} in {folder / PROJECTORS}: {e}") from None


def load_adapter(peft_model, folder: Path) -> None:
    from peft import set_peft_model_state_dict   # peft imports transformers: only when an adapter is loaded

    state = load_safetensors(folder / "adapter" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise CheckpointError(f"adapter in {folder} does not fit this model: unexpected keys {unexpected[:3]}")


def write_weights(model, folder: Path, proj_meta: Mapping[str, Any]) -> None:
    """The adapter (PEFT format) and the projectors into ``folder`` (which exists)."""
    model.llm.save_pretrained(str(folder / "adapter"), safe_serialization=True)
    save_projectors(model.projectors, folder, proj_meta)


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, torch's RuntimeError ("PytorchStreamWriter failed writing
    file ..."), safetensors' own error."""
    return (OSError, RuntimeError, SafetensorError)


def save_checkpoint(run: Path, step: int, model, optimizer, state: Mapping[str, Any],
                    proj_meta: Mapping[str, Any], keep_last: int = 1) -> Path:
    """A resumable checkpoint at ``<run>/checkpoints/step-N``, then the exported weights at the
    top of the run folder; older checkpoints beyond ``keep_last`` are removed only after both.

    A write that fails (disk full, ...) removes this save's temporary files and raises
    ``CheckpointWriteError``; the previous complete checkpoint and exported weights are untouched."""
    run = Path(run)
    ckdir = run / "checkpoints"
    final = ckdir / f"{STEP_PREFIX}{step:07d}"
    what = f"the step-{step} checkpoint"
    tmp: Path | None = None
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=ckdir))
        write_weights(model, tmp, proj_meta)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", dict(state))
        _replace_dir(tmp, final)
    except _write_errors() as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(run, what, e) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # exported weights beside the run's config: each piece replaced atomically
    t: Path | None = None
    try:
        for name in ("adapter",):
            t = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=run))
            shutil.rmtree(t)
            shutil.copytree(final / name, t)
            _replace_dir(t, run / name)
            t = None
        for name in (PROJECTORS, PROJECTORS_JSON):
            t = run / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(final / name, t)
            os.replace(t, run / name)
            t = None
    except _write_errors() as e:
        if t is not None:
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            else:
                t.unlink(missing_ok=True)
        raise write_failure(run, f"the exported weights of step {step}", e) from e
    for old in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run: Path) -> list[Path]:
    ckdir = Path(run) / "checkpoints"
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's state.json (step, data position, history, feature keys, ...)."""
    try:
        state = json.loads((Path(folder) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(folder) / 'state.json'} is unreadable: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{Path(folder) / 'state.json'} is not a JSON object")
    return state


def load_checkpoint(folder: Path, model, optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``folder``; returns its state.json."""
    state = read_state(folder)
    load_adapter(model.llm, folder)
    load_projectors(model.projectors, folder)
    try:
        optimizer.load_state_dict(load_torch(folder / "optimizer.pt"))
    except ValueError as e:   # other parameter groups or sizes
        raise CheckpointError(f"{folder / 'optimizer.pt'} does not fit this model's parameters ({e})") from None
    rng = load_torch(folder / "rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def saved_step(run: Path) -> int | None:
    """The step of the run's newest complete checkpoint (None: none yet)."""
    last = latest_checkpoint(run)
    return None if last is None else int(last.name[len(STEP_PREFIX):])


def resume_point(run: Path, step: int) -> tuple[str, int, Path | None]:
    """For training stopped at ``step``: (the one line saying how ``--resume`` continues, the step it
    continues from, that checkpoint's folder or None)."""
    at, last = saved_step(run), latest_checkpoint(run)
    if last is None:
        return (f"interrupted at step {step}, before the first checkpoint: rerun with --resume (it starts again "
                "from step 0)", 0, None)
    if at == step:
        return f"interrupted at step {at}: rerun with --resume (checkpoint {last})", at, last
    return (f"interrupted at step {step}: rerun with --resume, which continues from the last complete checkpoint, "
            f"step {at} ({last})", at, last)

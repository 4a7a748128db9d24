"""Run folders are never written over by accident, and never by two processes at once.

``check_out(path, resume=..., overwrite=...)`` decides what a command may do with its output folder
(``train --out``, ``import-checkpoint --out``), and touches nothing:

    absent, or empty                    "new"        a new run
    holds a run, --resume               "resume"     continue it
    holds a run, --overwrite            "overwrite"  ``clear_run`` then removes the old run whole
    holds a run, neither                refused      one line: --resume, --overwrite or another --out
    holds other files, no run           refused      naming a few of them; never deleted, even with --overwrite
    is a file                           refused

A folder "holds a run" when it has an emollama ``config.json`` (the sections of a training config),
a ``checkpoints/step-*`` folder, or exported weights (``adapter/adapter_model.safetensors`` or
``projectors.safetensors``). The run's own entries are :data:`RUN_ENTRIES` (and the hidden temporary
names built from them, ``.config.json.tmp-123``); ``clear_run`` removes those and nothing else, so a
user's file kept inside a run folder survives ``--overwrite``.

``resume_differences(path, cfg)`` lists what ``--resume`` may not change: every setting of the saved
``config.json`` except :data:`RUNTIME_SETTINGS` (where files are, the device, how often to save,
evaluate and log, loader processes, gradient checkpointing), which change how the run is carried out,
not the run. ``--max-steps`` is no setting (the schedule stays).

``lock(path, command)`` keeps a second writer out: ``path/.lock``, an exclusive non-blocking
``fcntl.flock`` held for the ``with`` block, holding ``{pid, host, command, started}`` as JSON. A second
writer gets :class:`RunFolderBusy` (exit status 5) naming the first. The kernel drops a flock when its
process dies, so a stale file never blocks; the holder removes the file when it lets go. Training
(rank 0) and ``import-checkpoint`` hold it on the run folder, ``eval`` on its report folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from .config import from_dict

log = logging.getLogger(__name__)

LOCK = ".lock"
#: What a run folder may hold: written by train, import-checkpoint, eval and infer.
RUN_ENTRIES = frozenset({
    "config.json", "feature_sets.json", "versions.json", "metrics.json", "imported.json", "subtitles.json",
    "adapter", "projectors.safetensors", "projectors.json", "checkpoints", "tb", "loss.png",
    "eval", "eval-store.zarr", LOCK,
})
CONFIG_SECTIONS = {"data", "model", "lora", "optim", "run"}
#: Settings a resumed run may change: they move no weight and no example.
RUNTIME_SETTINGS = frozenset({
    "data.root", "data.store", "data.workers", "model.offline", "model.home", "model.gradient_checkpointing",
    "run.out", "run.device", "run.save_every", "run.eval_every", "run.log_every", "run.keep_last",
    "run.eval_batch_size",
})


class RunFolderError(ValueError):
    """The output folder cannot be used as asked; the message says how to go on (exit status 2)."""


class RunFolderBusy(RunFolderError):
    """Another emollama process writes this folder now (its lock); exit status 5."""


def _own(name: str) -> bool:
    """An entry of the run itself: a known name, or a hidden temporary made from one (``.adapter-x1``,
    ``.config.json.tmp-123``, ``.loss.png.tmp.png``)."""
    if name in RUN_ENTRIES:
        return True
    return name.startswith(".") and any(name[1:].startswith(e) for e in RUN_ENTRIES)


def _is_run(path: Path) -> bool:
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            if CONFIG_SECTIONS <= set(json.loads(cfg.read_text())):
                return True
        except (OSError, ValueError, TypeError):
            pass
    ck = path / "checkpoints"
    if ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir()):
        return True
    return (path / "adapter" / "adapter_model.safetensors").is_file() or (path / "projectors.safetensors").is_file()


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_out(path: str | Path, *, resume: bool, overwrite: bool) -> str:
    """What may be done with output folder ``path``: "new", "resume" or "overwrite" (see the module
    docstring); raises RunFolderError otherwise. Reads only."""
    path = Path(path)
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it: choose one")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder: choose a folder for the run")
    # the lock, and temporaries of a run stopped before it wrote anything, count as empty
    entries = sorted(p.name for p in path.iterdir() if not (p.name.startswith(".") and _own(p.name))) \
        if path.is_dir() else []
    if not entries:
        return "new"
    if _is_run(path):
        if resume:
            return "resume"
        if overwrite:
            return "overwrite"
        raise RunFolderError(f"{path} holds a run already: pass --resume to continue it, --overwrite to replace it "
                             "(its checkpoints, TensorBoard log and eval reports are removed first), or choose "
                             "another --out")
    raise RunFolderError(f"{path} holds files that are not an emollama run ({_few(entries)}): choose an empty or new "
                         "--out (nothing there is deleted, even with --overwrite)")


def clear_run(path: str | Path) -> list[str]:
    """Remove the run's own entries from ``path`` (never the lock, never anything else); returns them."""
    path = Path(path)
    gone = []
    for p in sorted(path.iterdir()):
        if p.name == LOCK or not _own(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        gone.append(p.name)
    return gone


def resume_differences(path: str | Path, cfg) -> list[str]:
    """The settings of ``cfg`` (a TrainConfig) that differ from the run's saved ``config.json`` and that a
    resumed run may not change, as "optim.batch_size = 2 (the run has 4)"; [] when it has no config."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return []
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        return [f"{file} is unreadable ({e})"]
    if isinstance(raw.get("model"), dict):   # as train.run.read_run: older runs were trained without ln_vision
        raw["model"].setdefault("ln_vision", False)
    problems: list[str] = []
    saved = from_dict(raw, problems).to_dict()
    if problems:
        return [f"{file}: {p}" for p in problems]
    out = []
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in RUNTIME_SETTINGS and saved.get(section, {}).get(name) != value:
                out.append(f"{key} = {value!r} (the run has {saved.get(section, {}).get(name)!r})")
    return out


def _holder(file: Path) -> str:
    try:
        info = json.loads(file.read_text())
        return f"pid {info['pid']}: {info['command']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


@contextlib.contextmanager
def lock(path: str | Path, command: str) -> Iterator[Path]:
    """Hold ``path/.lock`` (the folder is created) for the ``with`` block; RunFolderBusy when another
    process holds it. Where the file system has no flock (some network mounts) a warning says so and
    the block runs unlocked. A folder this call created and the block left empty (it failed before
    writing anything) is removed again."""
    import fcntl   # POSIX only: imported where the lock is taken

    path = Path(path)
    fresh = not path.exists()
    try:
        yield from _locked(path, command, fcntl)
    finally:
        if fresh:
            with contextlib.suppress(OSError):
                path.rmdir()      # only when empty


def _locked(path: Path, command: str, fcntl) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    file = path / LOCK
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(f"{path} is in use by another emollama process ({_holder(file)}): wait for it to "
                                "finish, or choose another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: no file locks on this file system (%s); nothing keeps a second writer out",
                        path, os.strerror(e.errno))
            yield path
            return
        try:   # the holder before us may have removed the file after we opened it: lock the one in place
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):   # who holds it is for the message only: a full disk must not stop us
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(file)
        os.close(fd)   # closing drops the flock

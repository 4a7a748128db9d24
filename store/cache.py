"""The model cache folder (``EMOLLAMA_HOME``) and its race-safe builds of the tiny test fixtures.

Stage one's tiny encoders (``extract``) and stage two's tiny language models (``train``) are both built
once, in code, into ``<home>/models/tiny/<name>``: into a temporary folder first, then renamed into place,
so two processes building the same fixture at once both end with one complete copy. A marker names the
recipe the folder was built by, and a list of every file with its size and sha256 finds a truncated or
overwritten file: such a folder is rebuilt (with a warning). Both packages build through
:func:`build_once`; it lives here because ``extract`` and ``train`` may import the store and not each other.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import StorageError

__all__ = ["TINY_MARKER", "TINY_FILES", "default_home", "build_once", "cache_error", "build_damage"]

log = logging.getLogger(__name__)

TINY_MARKER = "emollama-tiny.json"
TINY_FILES = ".emollama-tiny-files.json"   # size and sha256 of every file (a dot file: weights identities skip it)


def default_home() -> Path:
    """The project's cache folder: env EMOLLAMA_HOME, else ~/.cache/emollama."""
    env = os.environ.get("EMOLLAMA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emollama"


def _manifest(folder: Path) -> dict[str, list]:
    """{file: [size, sha256]} of every file of a built folder (the tiny files hash in ms)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != TINY_FILES:
            out[p.relative_to(folder).as_posix()] = [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
    return out


def build_damage(folder: Path, recipe: int) -> str | None:
    """Why ``folder`` is not a complete build of ``recipe`` (None: it is): ``TINY_FILES`` names every file
    with its size and sha256, so a truncated or overwritten file is found and the folder rebuilt."""
    try:
        marker = json.loads((folder / TINY_MARKER).read_text())
        if not isinstance(marker, dict) or marker.get("recipe") != recipe:
            return "built by another recipe"
        want = json.loads((folder / TINY_FILES).read_text())
        if not isinstance(want, dict):
            raise ValueError(TINY_FILES)
        have = _manifest(folder)
    except (OSError, ValueError):
        return "missing" if not folder.exists() else f"its marker or its list of files ({TINY_FILES}) is missing or damaged"
    bad = sorted(f for f in want if have.get(f) != want[f])
    return f"{', '.join(bad)} missing, truncated or changed" if bad else None


def cache_error(home: Path, what: str, e: OSError) -> OSError:
    """One line for a model cache that cannot be written, naming EMOLLAMA_HOME and how to fix it (a
    FileNotFoundError when a file stands where the folder should be, else a StorageError)."""
    if e.errno in (errno.ENOTDIR, errno.EEXIST) or home.is_file():
        return FileNotFoundError(f"the model cache {home} (EMOLLAMA_HOME) is not a folder (a file stands in its "
                                 f"path), so {what} cannot be built there: set EMOLLAMA_HOME to a folder, or "
                                 "move the file away")
    return StorageError(f"cannot build {what} in the model cache {home} (EMOLLAMA_HOME): "
                        f"{e.strerror or e}; set EMOLLAMA_HOME to a writable folder (or free space there), then "
                        "rerun", e.errno)


def build_once(final: Path, marker: Mapping[str, Any], build: Callable[[Path], None], what: str,
               home: Path) -> Path:
    """``final``, built by ``build(tmp)`` into a temporary folder renamed into place, unless it already
    holds a complete build of ``marker["recipe"]``. ``marker`` is written as the folder's marker file (its
    keys in the order given); ``what`` names the fixture in log lines and errors."""
    recipe = marker["recipe"]
    why = build_damage(final, recipe)
    if why is None:
        return final
    if why != "missing":
        log.warning("%s in %s: %s; rebuilding it", what, final, why)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-build-", dir=final.parent))
        try:
            log.info("building %s (a random test fixture) into %s", what, final)
            build(tmp)
            (tmp / TINY_MARKER).write_text(json.dumps(dict(marker)) + "\n")
            (tmp / TINY_FILES).write_text(json.dumps(_manifest(tmp)) + "\n")
            if final.exists() and build_damage(final, recipe) is not None:
                # a stale recipe (or a broken folder): moved aside, then the new one put in place
                old = final.parent / f".{final.name}-old-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if build_damage(final, recipe) is not None:   # not another builder's finished copy: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise cache_error(home, what, e) from None
    return final

"""Where an encoder's weights come from, and their identity (the `weights` of every feature spec).

A `ModelSource` is a hub id ("org/name", optionally pinned by `revision`), a local folder, or a local
weights file in its authors' original layout (`config`: a folder or json for what the tensor shapes
cannot tell). Its identity is "sha256:<hex>" for a folder (over its files) or a file (its bytes),
hashed once and cached in `<home>/hashes.json` by (path, size, mtime), and "hub:<id>@<commit>" for a
hub id. Identities are computed without building any model. A file whose size or mtime differ is hashed
again, and so is one hashed within RACY_NS of its mtime (it may have changed again within the same mtime
tick); a damaged cache entry is ignored and rewritten.

Offline (HF_HUB_OFFLINE=1 or `offline=True`) a hub id missing from the local HF cache raises
`MissingWeightsError` at once, naming it and how to supply it (`DOWNLOAD_HINT`, the one spelling of
the download command everywhere). Online, the hub is asked once with a short probe (`hub_reachable`)
before anything is downloaded: when it does not answer, everything loads from local files only and a
missing model fails at once, instead of after huggingface_hub's retries (about 50 s per model).
`missing_models` lists every missing model of a job in one message.

Nothing heavy is imported at module level (huggingface_hub only inside functions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from emollama.extract.models import WEIGHT_SUFFIXES, WeightsFileError
from emollama.store.cache import default_home

log = logging.getLogger(__name__)

__all__ = [
    "ModelSource", "MissingWeightsError", "DamagedWeightsError", "MissingModel", "DOWNLOAD_HINT", "is_offline", "hub_endpoint",
    "hub_reachable", "local_only_reason", "missing_models", "hf_cache_dir", "cached_snapshot", "file_sha256",
    "file_hash", "folder_hash", "weights_identity", "config_identity", "resolve_pretrained", "read_json",
    "write_json_atomic",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelSource:
    """A hub id ("org/name", optionally pinned by `revision`), a local folder, or a local weights file.

    A weights file (.pth/.pt/.bin/.safetensors; for the encoders that convert one: vit_mae, videomae
    and eva) is a checkpoint in its authors' original layout; `config` optionally names a folder
    holding a config.json (or the
    json file) for what the tensor shapes cannot tell, e.g. the number of attention heads.
    """

    model: str
    revision: str | None = None
    config: str | None = None

    def local_path(self) -> Path | None:
        """The folder or weights file `model` names (resolved), or None for a hub id."""
        p = Path(self.model).expanduser()
        if p.is_dir():
            return p.resolve()
        if p.is_file():
            if p.suffix.lower() not in WEIGHT_SUFFIXES:
                raise ValueError(f"model {self.model!r} is a file but not a weights file "
                                 f"({', '.join(WEIGHT_SUFFIXES)}): point it at a checkpoint file or a model folder")
            return p.resolve()
        if p.suffix.lower() in WEIGHT_SUFFIXES or not _HUB_ID.match(self.model):
            raise FileNotFoundError(
                f"model {self.model!r} is neither an existing folder, nor an existing weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}), nor a hub id of the form 'org/name': fix the path in the "
                "encoders config"
            )
        return None

    def on_hub(self) -> bool:
        """Whether `model` is a hub id (not a local folder or file, nor a path that does not exist)."""
        try:
            return self.local_path() is None
        except (FileNotFoundError, ValueError):
            return False

    def weights_file(self) -> Path | None:
        """The weights file if `model` names one, else None (a folder or a hub id)."""
        local = self.local_path()
        return local if local is not None and local.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_value(cls, value: str | Mapping[str, Any] | "ModelSource", *,
                   base: Path | None = None) -> "ModelSource":
        """From "org/name", "path/to/folder", "path/to/file.pth", or a dict
        {"model": ..., "revision": ... (hub ids), "config": ... (weights files)}.

        A relative folder or file (model or config) is taken relative to `base` (e.g. the config
        file's folder) when it exists there.
        """
        if isinstance(value, ModelSource):
            return value
        if isinstance(value, str):
            model, revision, config = value, None, None
        else:
            unknown = set(value) - {"model", "revision", "config"}
            if unknown or "model" not in value:
                raise ValueError(f"an encoder source needs 'model' (and optionally 'revision' for a hub id or "
                                 f"'config' for a weights file), got {dict(value)}")
            model, revision, config = value["model"], value.get("revision"), value.get("config")

        def rebase(path: str) -> str:
            if base is not None and not Path(path).expanduser().is_absolute() and (Path(base) / path).exists():
                return str((Path(base) / path).resolve())
            return str(path)

        return cls(rebase(str(model)), revision, None if config is None else rebase(str(config)))




class MissingWeightsError(RuntimeError):
    """A checkpoint is not available locally and may not be downloaded."""


class DamagedWeightsError(WeightsFileError, MissingWeightsError):
    """A weights file that is truncated or corrupt (an interrupted copy or download): its weights are not
    here after all, so every command reports it as it does a missing model (one line, exit status 2)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline(offline: bool | None = None) -> bool:
    """`offline` if given, else env HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (read now, not at import)."""
    if offline is not None:
        return offline
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hf_cache_dir() -> Path:
    """The HF hub cache, resolved from the environment now (huggingface_hub freezes it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (default main) in the local HF cache, or None."""
    repo = Path(cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    if _SHA.match(rev):
        sha = rev
    else:
        try:
            sha = (repo / "refs" / rev).read_text().strip()
        except OSError:
            return None
    snap = repo / "snapshots" / sha
    return snap if (snap / "config.json").is_file() else None


# The one download hint of every missing-model message (code and docs spell it the same way; train.model
# keeps a copy, since train may not import extract, and a test keeps the two equal and checks that the
# installed huggingface_hub CLI takes these arguments).
DOWNLOAD_HINT = "`hf download REPO --local-dir DIR`"

PROBE_TIMEOUT_S = 3.0     # the hub probe: one HEAD request, no retries
PROBE_TTL_S = 60.0        # a probe's answer is reused this long (one probe per job, not one per model)
_PROBES: dict[str, tuple[float, bool]] = {}


def hub_endpoint() -> str:
    """The hub the libraries download from: HF_ENDPOINT, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers one HEAD request within `timeout` (through huggingface_hub's own HTTP
    client: its proxies and certificates). Any answer below 500 counts; an error, a timeout or a server
    error does not. Answers are reused for PROBE_TTL_S per endpoint."""
    url = hub_endpoint()
    hit = _PROBES.get(url)
    if hit is not None and time.monotonic() - hit[0] < PROBE_TTL_S:
        return hit[1]
    from huggingface_hub.utils import get_session

    try:
        ok = get_session().head(url, timeout=timeout, follow_redirects=False).status_code < 500
    except Exception as e:  # noqa: BLE001 - any failure to get an answer means: not reachable now
        log.info("the hub at %s cannot be reached (%s: %s)", url, type(e).__name__, e)
        ok = False
    _PROBES[url] = (time.monotonic(), ok)
    return ok


def local_only_reason(offline: bool | None = None) -> str | None:
    """Why models must come from local files only: "offline" (HF_HUB_OFFLINE=1 or --offline), "the hub
    at URL cannot be reached" (one probe), or None when they may be downloaded."""
    if is_offline(offline):
        return "offline: HF_HUB_OFFLINE=1 or --offline"
    if not hub_reachable():
        return f"the hub at {hub_endpoint()} cannot be reached"
    return None


@dataclass(frozen=True)
class MissingModel:
    """One model a job needs and cannot get: its hub id (or path), what it is for, where its folder is
    set, and why it is missing."""

    model: str                     # a hub id ("org/name", "@revision" appended when pinned) or a path
    role: str = "a model"          # "the audio encoder (hubert)", "the language model"
    setting: str = ""              # how to use a local folder instead: "[extract.encoders.audio] model = DIR"
    why: str = "not in the local HF cache"


def missing_models(missing: "list[MissingModel] | tuple[MissingModel, ...]", reason: str | None = None,
                   cache_dir: Path | None = None) -> MissingWeightsError:
    """One error naming every missing model, with one download hint (`DOWNLOAD_HINT`)."""
    n = len(missing)
    head = f"{n} model{'s are' if n != 1 else ' is'} missing"
    where = [reason] if reason else []
    where.append(f"HF cache: {cache_dir or hf_cache_dir()}")
    lines = [f"{head} ({'; '.join(where)}):"]
    for m in missing:
        lines.append(f"  - {m.model}: {m.role}, {m.why}" + (f" (set its folder: {m.setting})" if m.setting else ""))
    pinned = " (REPO@REV: add --revision REV)" if any("@" in m.model for m in missing) else ""
    lines.append(f"Download {'each' if n != 1 else 'it'} with {DOWNLOAD_HINT}{pinned} on a machine with internet, "
                 "copy DIR here and set it as shown; or copy that machine's HF cache (~/.cache/huggingface/hub) "
                 "to this one's.")
    return MissingWeightsError("\n".join(lines))


def source_name(source: ModelSource) -> str:
    """A source as the messages name it: the model, "@revision" appended when pinned."""
    return f"{source.model}@{source.revision}" if source.revision else source.model


def missing_weights(source: ModelSource, cache_dir: Path, reason: str | None,
                    why: str = "not in the local HF cache") -> MissingWeightsError:
    """The error for one encoder source missing here (`missing_models` with one entry)."""
    return missing_models([MissingModel(source_name(source), "an encoder", "model = DIR in its encoders table",
                                        why)], reason, cache_dir)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RACY_NS = 3_000_000_000   # a file modified this close before it was hashed may change again within its mtime tick


def _entry_ok(hit: Any, st: os.stat_result) -> bool:
    """A cached hash is trusted when it is well-formed, the file's size and mtime are the ones hashed,
    and it was hashed more than RACY_NS after that mtime (as git does with its index: a file rewritten
    within the file system's mtime resolution right after hashing would otherwise keep its old hash)."""
    return (isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns
            and isinstance(hit.get("checked_ns"), int) and hit["checked_ns"] - st.st_mtime_ns > RACY_NS
            and isinstance(hit.get("sha256"), str) and bool(_SHA256.match(hit["sha256"])))


class _HashCache:
    """Per-file sha256 hashes cached in `<home>/hashes.json`, keyed by (resolved path, size, mtime_ns).

    A damaged file or entry is ignored (the file is hashed again and the entry rewritten); a file whose
    size or mtime differ from the entry's is hashed again."""

    def __init__(self, home: Path | None):
        self.home = Path(home) if home is not None else default_home()
        self.file = self.home / "hashes.json"
        try:
            self.cache = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.cache = {}
        if not isinstance(self.cache, dict):
            self.cache = {}
        self.changed = False

    def digest(self, path: Path) -> str:
        real = Path(path).resolve()
        st = real.stat()
        hit = self.cache.get(str(real))
        if _entry_ok(hit, st):
            return hit["sha256"]
        checked = time.time_ns()
        digest = file_sha256(real)
        self.cache[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                                 "checked_ns": checked}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            write_json_atomic(self.file, self.cache, what="the hash cache")


def write_json_atomic(file: Path, content: Any, *, what: str) -> None:
    """Write `content` as JSON to `file` through a temporary file and a rename (readers see the old or the
    new file, never half of one); an unwritable home only logs a warning (a cache costs re-work only)."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}-", suffix=".json", dir=file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f, indent=0, sort_keys=True)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not write %s %s: %s", what, file, e)


def file_hash(path: Path, *, home: Path | None = None) -> str:
    """"sha256:<hex of the file's bytes>", through the same per-file cache as `folder_hash`."""
    cache = _HashCache(home)
    digest = cache.digest(Path(path))
    cache.save()
    return "sha256:" + digest


def folder_hash(folder: Path, *, home: Path | None = None) -> str:
    """sha256 over sorted (relative path, sha256 of file) of a folder's files.

    Files and folders whose name starts with "." are skipped (e.g. `.cache/huggingface`), symlinks are
    followed (HF snapshots are links into blobs). Per-file hashes are cached in `<home>/hashes.json`,
    keyed by (resolved path, size, mtime_ns), so multi-GB checkpoints are hashed once.
    """
    folder = Path(folder)
    cache = _HashCache(home)
    entries = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            entries.append((path.relative_to(folder).as_posix(), cache.digest(path)))
    if not entries:
        raise FileNotFoundError(f"model folder {folder} has no files")
    cache.save()
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\t{digest}\n".encode())
    return "sha256:" + h.hexdigest()


def weights_identity(source: ModelSource, *, offline: bool, home: Path | None = None) -> str:
    """"sha256:<hex>" for a local folder (see `folder_hash`) or weights file (the file's sha256, see
    `file_hash`); "hub:<id>@<commit>" for a hub id.

    A hub id's commit comes from the local HF cache when offline or when the hub does not answer its
    probe (MissingWeightsError at once when absent), else from the hub (falling back to the cache if
    the hub fails to answer this question).
    """
    local = source.local_path()
    if local is not None:
        return file_hash(local, home=home) if local.is_file() else folder_hash(local, home=home)
    cache_dir = hf_cache_dir()
    snap = cached_snapshot(source.model, source.revision, cache_dir)
    reason = local_only_reason(offline)
    if reason is not None:
        if snap is None:
            raise missing_weights(source, cache_dir, reason)
        return f"hub:{source.model}@{snap.name}"
    if source.revision and _SHA.match(source.revision):
        return f"hub:{source.model}@{source.revision}"
    from huggingface_hub import HfApi
    try:
        sha = HfApi().model_info(source.model, revision=source.revision).sha
    except Exception as e:
        if snap is not None:
            log.warning("hub unreachable for %s (%s): using the cached snapshot %s", source.model, e, snap.name)
            return f"hub:{source.model}@{snap.name}"
        raise missing_weights(source, cache_dir, None, f"the hub could not be asked ({type(e).__name__}: {e})") from e
    return f"hub:{source.model}@{sha}"


def config_identity(source: ModelSource, *, home: Path | None = None) -> str | None:
    """The identity of a weights file's `config` (a folder or json file: its sha256, cached as weights
    are), or None when the source names none. It is not part of the weights identity, but what the
    encoder reads from it (heads, image statistics) reaches its params."""
    if source.config is None:
        return None
    p = Path(source.config).expanduser()
    if p.is_dir():
        return folder_hash(p, home=home)
    if p.is_file():
        return file_hash(p, home=home)
    return f"missing:{p}"   # loading says what is wrong; no entry is cached for a source that fails to load


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolve_pretrained(source: ModelSource, offline: bool, home: Path | None):
    """-> (folder with the configs, pretrained name, from_pretrained kwargs, identity).

    Local folders and cached snapshots load with local_files_only (offline, or when the hub does not
    answer its probe); online hub ids download the json files first (to pin the commit), then the
    weights through the library's own loader.
    """
    local = source.local_path()
    if local is not None:
        return local, str(local), {"local_files_only": True}, folder_hash(local, home=home)
    cache_dir = hf_cache_dir()
    reason = local_only_reason(offline)
    if reason is not None:
        snap = cached_snapshot(source.model, source.revision, cache_dir)
        if snap is None:
            raise missing_weights(source, cache_dir, reason)
        return snap, str(snap), {"local_files_only": True}, f"hub:{source.model}@{snap.name}"
    from huggingface_hub import snapshot_download
    try:
        snap = Path(snapshot_download(source.model, revision=source.revision, cache_dir=cache_dir,
                                      allow_patterns=["*.json"]))
    except Exception as e:
        raise missing_weights(source, cache_dir, None, f"download failed ({type(e).__name__}: {e})") from e
    kwargs = {"revision": snap.name, "cache_dir": str(cache_dir)}
    return snap, source.model, kwargs, f"hub:{source.model}@{snap.name}"


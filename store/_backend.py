"""Plain file operations under a store root: a local directory or any fsspec URL.

Zarr does the array I/O; this module does the few things the store needs around it: whole-object
writes of small JSON files (commit marks, group metadata), listings, deletes and a file walk.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import zarr
import zarr.storage

__all__ = ["Backend", "open_backend"]


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


class Backend:
    url: str
    storage_options: dict[str, Any]
    zstore: Any

    def read_bytes(self, rel: str) -> bytes: ...
    def write_atomic(self, rel: str, data: bytes, *, exclusive: bool = False) -> bool: ...
    def listdir(self, rel: str) -> list[str]: ...
    def exists(self, rel: str) -> bool: ...
    def remove_file(self, rel: str) -> None: ...
    def remove_tree(self, rel: str) -> None: ...
    def walk(self, rel: str = "") -> list[tuple[str, int]]: ...
    def invalidate(self) -> None: ...
    def is_empty(self) -> bool: ...
    def abspath(self, rel: str) -> str: ...


class LocalBackend(Backend):
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.url = str(self.root)
        self.storage_options = {}
        self.zstore = zarr.storage.LocalStore(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def abspath(self, rel: str) -> str:
        return str(self._p(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def write_atomic(self, rel: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write a whole file via a temporary file + rename; with exclusive, keep an existing file."""
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:  # the temporary file goes whatever fails (a full disk must not keep half-written files)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # fails when the file exists: first writer wins
                except FileExistsError:
                    return False
                return True
            os.replace(tmp, path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except FileNotFoundError:
            return []

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def remove_file(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self._p(rel), ignore_errors=True)

    def walk(self, rel: str = "") -> list[tuple[str, int]]:
        out = []
        base = self._p(rel)
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                try:
                    out.append((p.relative_to(self.root).as_posix(), p.stat().st_size))
                except FileNotFoundError:
                    pass
        return out

    def invalidate(self) -> None:
        pass

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())


class FsspecBackend(Backend):
    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        import fsspec   # only for a remote store (fsspec URL): local stores never import it

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.zstore = zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options)

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def abspath(self, rel: str) -> str:
        return self._p(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def write_atomic(self, rel: str, data: bytes, *, exclusive: bool = False) -> bool:
        # an object store PUT is atomic by nature: readers see the old object, nothing, or the new one
        path = self._p(rel)
        if exclusive and self.exists(rel):
            return False
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(path)
        return True

    def listdir(self, rel: str) -> list[str]:
        path = self._p(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path)

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self._p(rel))
        return self.fs.exists(self._p(rel))

    def remove_file(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._p(rel))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._p(rel))

    def remove_tree(self, rel: str) -> None:
        try:
            self.fs.rm(self._p(rel), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._p(rel))

    def walk(self, rel: str = "") -> list[tuple[str, int]]:
        base = self._p(rel)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        return [(p[len(self.root) + 1 :], int(d.get("size") or 0)) for p, d in found.items()]

    def invalidate(self) -> None:
        self.fs.invalidate_cache()

    def is_empty(self) -> bool:
        return not self.listdir("")


def open_backend(url: str | Path, storage_options: dict[str, Any] | None = None) -> Backend:
    if isinstance(url, Path) or not _is_url(str(url)):
        s = str(url)
        if s.startswith("file://"):
            s = s[len("file://") :]
        if storage_options:
            raise ValueError("storage_options only apply to fsspec URLs such as s3://bucket/prefix")
        return LocalBackend(Path(s))
    return FsspecBackend(str(url), storage_options)

"""The store's errors: a write that cannot be done (full disk, read-only, no permission) in one line."""

from __future__ import annotations

import errno

__all__ = ["StorageError", "StoreFullError", "UnknownSetError", "storage_error"]


class StorageError(OSError):
    """The store cannot be written (disk full, read-only, no permission) or is damaged beyond what the
    operation can handle. Raised after the operation has removed what it had written: nothing committed
    was lost. ``str()`` is one line saying what happened and what to do; ``errno`` is the cause's."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple:  # keeps errno across processes (dask workers)
        return (type(self), (str(self), self.errno))


class StoreFullError(StorageError):
    """No space left on the store's device (ENOSPC, EDQUOT)."""


class UnknownSetError(KeyError):
    """A feature set name or key the store does not hold (or a name several sets share); the message lists
    the sets there are. A KeyError, printed as its message (no quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def storage_error(url: str, e: OSError, doing: str, need_bytes: int | None = None) -> StorageError:
    """The one-line :class:`StorageError` for an OSError ``e`` raised while ``doing`` something in ``url``."""
    code = getattr(e, "errno", None)
    why = e.strerror or str(e) or type(e).__name__
    if code in (errno.ENOSPC, errno.EDQUOT):
        need = f" (it writes up to about {need_bytes / 1e6:.1f} MB)" if need_bytes else ""
        err: StorageError = StoreFullError(
            f"disk full while {doing} in {url}: nothing committed was lost and the partial output was removed; "
            f"free space{need} and rerun", code)
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        err = StorageError(f"{url} is not writable ({why}) while {doing}: nothing committed was lost; "
                           "make it writable or use another store, then rerun", code)
    else:
        err = StorageError(f"storage error while {doing} in {url} ({why}): nothing committed was lost and the "
                           "partial output was removed; fix the cause and rerun", code)
    return err

"""A fast path for reading row ranges of the store's own sharded arrays on a local disk.

Zarr costs about a millisecond per read call plus a few hundred microseconds per chunk, which is
most of the time a random per-clip read takes. The store writes one known codec layout (sharding
with inner ``bytes -> blosc -> crc32c`` chunks, index ``bytes -> crc32c`` at the end), so on a
local disk this module reads it directly: the shard index once per shard, then ``os.pread`` of the
needed chunks, checksum check and blosc decompression. Arrays in any other layout (or on a
remote store) are read through Zarr; :func:`supports` says which. ``verify()`` always reads
through Zarr, so the two paths check each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc

__all__ = ["ShardReader", "supports"]

_MISSING = np.uint64(2**64 - 1)


def _codec_names(codecs: list[dict]) -> list[str]:
    return [c["name"] for c in codecs]


def supports(meta: dict) -> bool:
    """True when an array's metadata (``zarr.json`` as a dict) is the layout this reader decodes."""
    try:
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            return False
        conf = codec["configuration"]
        inner, index = conf["codecs"], conf["index_codecs"]
        return (
            _codec_names(inner) == ["bytes", "blosc", "crc32c"]
            and inner[0].get("configuration", {}).get("endian", "little") == "little"
            and _codec_names(index) == ["bytes", "crc32c"]
            and index[0].get("configuration", {}).get("endian", "little") == "little"
            and conf.get("index_location", "end") == "end"
            and meta["chunk_grid"]["name"] == "regular"
            and meta["chunk_key_encoding"]["name"] == "default"
            and all(c == s for c, s in zip(conf["chunk_shape"][1:], meta["shape"][1:]))
            and all(c == s for c, s in zip(meta["chunk_grid"]["configuration"]["chunk_shape"][1:], meta["shape"][1:]))
            and np.dtype(meta["data_type"]).kind in "fiub"
        )
    except (KeyError, TypeError, ValueError):
        return False


class ShardReader:
    """Rows ``[a, b)`` of one array whose trailing dims are whole in every chunk and shard."""

    def __init__(self, array_dir: Path, meta: dict[str, Any]) -> None:
        conf = meta["codecs"][0]["configuration"]
        self.dir = Path(array_dir)
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.chunk_rows = int(conf["chunk_shape"][0])
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.row_shape = self.shape[1:]
        self.chunks_per_shard = self.shard_rows // self.chunk_rows
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self._suffix = sep.join("0" for _ in self.row_shape)
        self._sep = sep
        self._fill = meta.get("fill_value", 0)
        self._fds: dict[int, int] = {}
        self._index: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:  # best effort
        self.close()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: keep our own descriptors
            self._fds, self._index, self._pid = {}, {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            key = self._sep.join(["c", str(shard), *(["0"] * len(self.row_shape))])
            fd = os.open(self.dir / key, os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def _shard_index(self, shard: int) -> np.ndarray:
        idx = self._index.get(shard)
        if idx is None:
            fd = self._fd(shard)
            n = self.chunks_per_shard
            size = os.fstat(fd).st_size
            raw = os.pread(fd, n * 16 + 4, size - (n * 16 + 4))
            if len(raw) != n * 16 + 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ValueError(f"{self.dir}: shard {shard} index is damaged (run `emollama store verify`)")
            idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)
            self._index[shard] = idx
        return idx

    def _chunk(self, c: int) -> np.ndarray:
        shard, j = divmod(c, self.chunks_per_shard)
        off, nb = self._shard_index(shard)[j]
        shape = (self.chunk_rows, *self.row_shape)
        if off == _MISSING:
            return np.full(shape, self._fill, dtype=self.dtype)
        raw = os.pread(self._fd(shard), int(nb), int(off))
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ValueError(f"{self.dir}: chunk {c} fails its checksum (run `emollama store verify`)")
        return np.frombuffer(blosc.decompress(raw[:-4]), dtype=self.dtype).reshape(shape)

    def read_spans(self, spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """Rows ``[a, b)`` for each span; chunks shared by several spans are decoded once."""
        cache: dict[int, np.ndarray] = {}
        out = []
        cr = self.chunk_rows
        for a, b in spans:
            if not 0 <= a < b <= self.shape[0]:
                raise IndexError(f"rows {a}..{b} outside {self.shape[0]} rows of {self.dir}")
            c0, c1 = a // cr, (b - 1) // cr
            parts = []
            for c in range(c0, c1 + 1):
                chunk = cache.get(c)
                if chunk is None:
                    chunk = cache[c] = self._chunk(c)
                lo = max(a, c * cr) - c * cr
                hi = min(b, (c + 1) * cr) - c * cr
                parts.append(chunk[lo:hi])
            out.append(parts[0].copy() if len(parts) == 1 else np.concatenate(parts))
        return out

"""A torch Dataset over feature sets of a store: batched reads, small sets held in memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .store import FeatureStore

__all__ = ["FeatureDataset", "IN_MEMORY_BYTES"]

IN_MEMORY_BYTES = 256 * 1024 * 1024  # in_memory=None holds a set whole below this many bytes
_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller element-wise ops run on the calling thread


class FeatureDataset(torch.utils.data.Dataset):
    """Items ``{"id": clip_id, <key>: tensor, ...}`` for the clips complete in every key.

    ``keys`` may be set keys or unique names; items are keyed by the resolved keys (see ``.keys``).
    ``in_memory``: True holds every set in memory, False none, None (default) each set whose stored
    size is below ``IN_MEMORY_BYTES``. Worker-safe: the store is reopened lazily in each worker
    process, and the dataset pickles without it. ``__getitems__`` reads a whole batch with one read
    per set and segment (torch's DataLoader calls it); collating variable-length items is the
    caller's business.
    """

    def __init__(
        self,
        store: FeatureStore | str | Path,
        keys: Sequence[str],
        clip_ids: Sequence[str] | None = None,
        *,
        in_memory: bool | None = None,
        dtype: torch.dtype = torch.float32,
        storage_options: dict | None = None,
    ) -> None:
        st = store if isinstance(store, FeatureStore) else FeatureStore.open(
            store, create=False, storage_options=storage_options)
        self._url = st.url
        self._storage_options = st.storage_options or None
        self._store: FeatureStore | None = st
        self._pid = os.getpid()
        if isinstance(keys, str):
            keys = [keys]
        if not keys:
            raise ValueError("FeatureDataset needs at least one feature set (name or key)")
        self.keys: list[str] = [st.resolve(k) for k in keys]
        self.dtype = dtype
        complete = [st.complete(k) for k in self.keys]
        if clip_ids is None:
            self.clip_ids: list[str] = sorted(set.intersection(*complete))
        else:
            self.clip_ids = list(clip_ids)
            for k, have in zip(self.keys, complete):
                missing = [c for c in self.clip_ids if c not in have]
                if missing:
                    raise KeyError(
                        f"{len(missing)} requested clip(s) are not complete in set {k}: {missing[:5]} "
                        "(extract them first, or pass clip_ids=None for the clips complete in every set)"
                    )
        self._mem: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        specs = st.sets()
        self._variable = {k for k in self.keys if specs[k].variable}
        for k in self.keys:
            spec = specs[k]
            if in_memory is None:
                hold = st.nbytes(k, self.clip_ids) < IN_MEMORY_BYTES
            else:
                hold = bool(in_memory)
            if hold and self.clip_ids:
                arrays = st.read_many(self.clip_ids, k)
                if spec.variable:
                    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
                    np.cumsum([len(a) for a in arrays], out=offsets[1:])
                    self._mem[k] = (np.concatenate(arrays), offsets)
                else:
                    self._mem[k] = (np.stack(arrays), None)

    @property
    def in_memory_keys(self) -> list[str]:
        return [k for k in self.keys if k in self._mem]

    def store(self) -> FeatureStore:
        """The store, reopened once per process (DataLoader workers get their own)."""
        if self._store is None or self._pid != os.getpid():
            self._store = FeatureStore.open(self._url, create=False, storage_options=self._storage_options)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        ids = [self.clip_ids[i] for i in indices]
        items: list[dict[str, Any]] = [{"id": c} for c in ids]
        for k in self.keys:
            if k in self._mem:
                data, offsets = self._mem[k]
                if offsets is None:
                    rows = self._convert(data[np.asarray(indices, dtype=np.int64)])
                else:
                    rows = self._split([data[offsets[i] : offsets[i + 1]] for i in indices])
            else:
                arrays = self.store().read_many(ids, k)
                rows = self._split(arrays) if k in self._variable else self._convert(np.stack(arrays))
            for item, row in zip(items, rows):
                item[k] = row
        return items

    def _convert(self, block: np.ndarray) -> torch.Tensor:
        """One dtype conversion per batch, in pieces below torch's intra-op grain size: the copy is
        memory-bound, and on a small, busy machine waking the thread pool for it costs ~100x more
        than the copy itself (measured: 11 ms vs 5 us for 50x1024 fp16 -> fp32 at load 6 on 2 cores)."""
        src = torch.from_numpy(block)
        if src.dtype == self.dtype:
            return src
        out = torch.empty(src.shape, dtype=self.dtype)
        flat_src, flat_out = src.reshape(-1), out.view(-1)
        for i in range(0, flat_src.numel(), _GRAIN):
            flat_out[i : i + _GRAIN].copy_(flat_src[i : i + _GRAIN])
        return out

    def _split(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        flat = self._convert(np.concatenate(arrays))
        return torch.split(flat, [len(a) for a in arrays])

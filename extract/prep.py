"""Preparation apart from encoding: P processes decode clips, track faces and cut crops, while the
encoding process (one per GPU) encodes micro-batches of the clips prepared before.

The pool is torch's DataLoader, used as a process pool, because it already does what this needs:
- results come back in the order asked, whatever worker made them, so the micro-batches, hence the
  values, do not depend on P;
- a torch tensor in a result travels through shared memory: its storage moves to a shared segment
  and only a handle crosses the pipe, so pixels are never pickled;
- read-ahead is bounded (`prefetch_factor`), a worker that dies is reported (the task then fails as a
  whole and a rerun redoes it), and `persistent_workers` keeps the processes between tasks.
The clips are the sampler's "indices": a persistent loader re-reads its sampler at each pass, so one
pool serves every task a worker process runs.

Workers are forked: they start in milliseconds with the parent's imports and its CPU face detector,
and never touch CUDA. A daemonic process (a default dask worker) may not start children: there the
preparation falls back to a thread of the encoding process (`usable_workers` says why).

Forking has one rule: start the processes before torch computes on a CPU in any thread but this one.
A process that prepared clips in a thread (`prep_workers = 0`: MTCNN there) and then started a pool
had a worker spin forever in MTCNN's first Linear layer (2 runs in 8 of tests/extract/test_prep.py).
One run of `emollama extract` uses one or the other, never both.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)


def sleeping_idle_threads() -> None:
    """Make torch's OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE, unless already set), so they
    do not spin on the cores the preparation processes need; values do not change. Effective only before
    torch is first imported in this process (the CLI calls it first thing).
    Measured: 48 sample clips at 2.9 clips/s spinning, 4.0 sleeping (2 cores, tiny profile, P=2)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_workers() -> int:
    """Preparation processes when the setting is auto: the cores this encoding worker owns, i.e. its
    torch intra-op threads (a dask worker's share of the machine, or every core in process)."""
    import torch

    return max(1, torch.get_num_threads())


_WARNED: set[str] = set()


def usable_workers(requested: int) -> int:
    """`requested`, or 0 (a thread) where this process cannot start preparation processes."""
    if requested <= 0:
        return 0
    why = None
    if multiprocessing.current_process().daemon:
        why = ("this process is daemonic (a dask worker started with the default distributed.worker.daemon "
               "= True) and may not start children; start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False "
               "to prepare clips in parallel")
    elif "fork" not in multiprocessing.get_all_start_methods():
        why = "this platform cannot fork"
    if why:
        if why not in _WARNED:
            _WARNED.add(why)
            log.warning("preparing clips in a thread, not %d process(es): %s", requested, why)
        return 0
    return requested


def _identity(x: Any) -> Any:
    return x


class _Jobs:
    """The sampler: the items of the current pass (set by `PrepPool.map` before each pass)."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _Apply:
    """The dataset: `fn(item, arg)` for each item the sampler names."""

    def __init__(self, fn: Callable, arg: Any) -> None:
        self.fn, self.arg = fn, arg

    def __getitem__(self, item):
        return self.fn(item, self.arg)


class PrepPool:
    """`workers` processes mapping `fn(item, arg)` over items, results in order; `fn` must be a module
    function and return its arrays as torch tensors (they come back through shared memory).
    `ahead`: results each worker may hold ready before they are taken; `init(worker_id)` runs first in
    each worker (torch already runs on one thread there)."""

    def __init__(self, fn: Callable, arg: Any, workers: int, ahead: int = 2,
                 init: Callable[[int], None] | None = None) -> None:
        import torch
        from torch.utils.data import DataLoader

        self.workers = workers
        self._jobs = _Jobs()
        self._loader = DataLoader(
            _Apply(fn, arg), sampler=self._jobs, batch_size=None, collate_fn=_identity, num_workers=workers,
            persistent_workers=True, prefetch_factor=max(2, ahead), multiprocessing_context="fork", worker_init_fn=init,
            generator=torch.Generator().manual_seed(0))   # its own generator: the global RNG is not drawn on

    def map(self, items: Iterable) -> Iterator[Any]:
        """fn of each item, in order. A worker that dies raises (RuntimeError): close this pool then.

        The workers start (or, after the first pass, resume) here, in the calling thread; the results may
        then be read from any thread. (Workers forked from another thread exit with status 1 when closed,
        which torch reports as a dead worker: tests/extract/test_prep.py.)"""
        self._jobs.items = list(items)
        passing = iter(self._loader) if self._jobs.items else iter(())
        return (x for x in passing)

    def close(self) -> None:
        it = getattr(self._loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self._loader._iterator = None


def thread_map(fn: Callable, arg: Any, items: Iterable, ahead: int) -> Iterator[Any]:
    """fn of each item, in order, computed by one background thread up to `ahead` items in advance
    (preparation with no process: it overlaps the decoder and MTCNN, which release the GIL, with
    the caller's encoding)."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emollama-prep") as pool:
        pending: deque = deque()
        nxt = 0
        try:
            while nxt < len(items) or pending:
                while nxt < len(items) and len(pending) < max(1, ahead):
                    pending.append(pool.submit(fn, items[nxt], arg))
                    nxt += 1
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


_POOLS: dict[Any, PrepPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(key: Any, fn: Callable, arg: Any, workers: int, ahead: int,
             init: Callable[[int], None] | None = None) -> PrepPool:
    """This process's pool for `key` (started on first use; one at a time, like the models)."""
    with _POOLS_LOCK:
        if key not in _POOLS:
            close_pools()
            _POOLS[key] = PrepPool(fn, arg, workers, ahead, init)
            log.info("started %d preparation process(es) in process %d", workers, os.getpid())
        return _POOLS[key]


def drop_pool(key: Any) -> None:
    """Close and forget the pool of `key` (after a worker died: the next task starts a new one)."""
    with _POOLS_LOCK:
        pool = _POOLS.pop(key, None)
    if pool is not None:
        _close(pool)


def close_pools() -> None:
    """Close every pool of this process (callers hold `_POOLS_LOCK` or know no task runs)."""
    for key in list(_POOLS):
        _close(_POOLS.pop(key))


def _close(pool: PrepPool) -> None:
    try:
        pool.close()
    except Exception:  # noqa: BLE001 - a broken pool is being discarded anyway
        log.debug("closing a preparation pool failed", exc_info=True)

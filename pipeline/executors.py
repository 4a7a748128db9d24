"""Executors: where steps run. Steps (extract.step.run_batch) know nothing of them.

- `InlineExecutor`: this process, one task after another (workers = 0; tests, debugging).
- `DaskExecutor`: a dask.distributed cluster: a local one sized by `workers`, or an existing
  scheduler by address. Each worker process keeps its models between tasks.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)


class InlineExecutor:
    name = "in-process"
    dashboard: str | None = None

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def map_unordered(self, fn: Callable, items: Iterable, **kwargs: Any) -> Iterator[tuple[Any, Any, BaseException | None]]:
        """Yield (item, result, error) as tasks finish."""
        for item in items:
            try:
                yield item, fn(item, **kwargs), None
            except Exception as e:  # noqa: BLE001 - the caller records the task as failed
                log.debug("task failed", exc_info=True)
                yield item, None, e

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DaskExecutor(InlineExecutor):
    def __init__(self, workers: int = 1, scheduler: str | None = None, threads_per_worker: int | None = None):
        if not logging.getLogger().isEnabledFor(logging.INFO):
            # distributed sets up its own INFO logging on import: keep it quiet unless -v
            os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        from distributed import Client, LocalCluster

        self._cluster = None
        if scheduler:
            self.client = Client(scheduler, timeout="30s")
            self.name = f"dask scheduler {scheduler}"
        else:
            cores = os.cpu_count() or 1
            threads = threads_per_worker or max(1, cores // max(1, workers))
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "TOKENIZERS_PARALLELISM": "false"}
            for var in ("HF_HUB_OFFLINE", "EMOLLAMA_HOME", "HF_HOME"):
                if var in os.environ:
                    env[var] = os.environ[var]
            # one task at a time per worker (threads_per_worker=1): the step overlaps decoding with
            # encoding inside the task, and torch uses `threads` cores.
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=":0", silence_logs=logging.ERROR, env=env)
            self.client = Client(self._cluster)
            self.name = f"local dask cluster, {workers} worker(s) x {threads} thread(s)"
        self.dashboard = self.client.dashboard_link

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self.client.submit(fn, *args, pure=False, **kwargs).result()

    def map_unordered(self, fn, items, **kwargs):
        from distributed import as_completed

        items = list(items)
        futures = {self.client.submit(fn, item, pure=False, **kwargs): item for item in items}
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                yield item, fut.result(), None
            except Exception as e:  # noqa: BLE001
                log.debug("task failed", exc_info=True)
                yield item, None, e
            finally:
                fut.release()

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(workers: int, scheduler: str | None = None) -> InlineExecutor:
    if scheduler:
        return DaskExecutor(scheduler=scheduler)
    if workers <= 0:
        return InlineExecutor()
    return DaskExecutor(workers=workers)

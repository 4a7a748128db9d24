"""Executors: where steps run. Steps (extract.step.run_batch) know nothing of them.

- `InlineExecutor`: this process, one task after another (workers = 0; tests, debugging).
- `DaskExecutor`: a dask.distributed cluster: a local one sized to the machine, or an existing
  scheduler by address (a user's Slurm / Kubernetes / hand-started cluster; see docs/scale.md).
  Each worker process keeps its models between tasks (extract.step.models caches them).

GPUs go through dask worker *resources*: a worker started with ``--resources GPU=1`` owns one GPU,
and every task is submitted with ``resources={"GPU": 1}`` as soon as the cluster has such workers,
so a worker runs one task at a time on its GPU and holds one copy of the models. A local cluster
on a machine with GPUs (and ``device`` auto or cuda) starts one worker per visible GPU, each with
``CUDA_VISIBLE_DEVICES`` set to its own GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

# what a worker process needs from this environment to find models offline
FORWARDED_ENV = ("HF_HUB_OFFLINE", "EMOLLAMA_HOME", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME", "OMP_WAIT_POLICY",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
GPU = "GPU"   # the dask worker resource name: `dask worker ADDRESS --resources GPU=1`


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, e.g. a Slurm allocation, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def visible_gpus(device: str = "auto") -> list[str]:
    """Ids of the CUDA devices a local cluster gives one worker each: [] for CPU work, and for one
    named device (cuda:N), which all `workers` processes then share."""
    if device not in ("auto", "cuda"):
        return []
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU workers
        return []
    if n == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def _in_worker(fn: Callable, threads: int | None, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` in a dask worker with torch on `threads` intra-op threads.

    dask's nanny starts workers with OMP_NUM_THREADS=1 (distributed.nanny.pre-spawn-environ), so
    without this a local worker runs torch on one thread whatever the machine has. Set per task (a
    no-op after the first), so a worker restarted after a crash gets it too."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return fn(*args, **kwargs)


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in this process for a while. Local worker processes started meanwhile inherit it,
    so a Ctrl-C, which the terminal sends to every process of the group, reaches this process alone: it
    stops the run and closes the cluster, and no worker prints its own KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint() -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the worker's main thread: its inherited setting stands
        pass


def _sigint_plugin():
    """A worker plugin that ignores SIGINT in each worker, restarted ones included (a local cluster's
    nanny restarts a dead worker after the process-wide setting above was restored)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class IgnoreSigint(WorkerPlugin):
        name = "emollama-ignore-sigint"

        def setup(self, worker):
            _ignore_sigint()

    return IgnoreSigint()


def torch_threads() -> int:
    """torch's intra-op threads in this process (tests ask workers with client.run)."""
    import torch

    return torch.get_num_threads()


class InlineExecutor:
    name = "in-process"
    dashboard: str | None = None
    resources: dict[str, float] | None = None
    threads: int | None = None
    local_processes: int | None = 1   # computing processes on this machine (None: a cluster elsewhere)

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def map_unordered(self, fn: Callable, items: Iterable, *, many: Callable | None = None,
                      **kwargs: Any) -> Iterator[tuple[Any, Any, BaseException | None]]:
        """Yield (item, result, error) as tasks finish (in this process: in order).

        `many(items, **kwargs)`, when given, runs them all as one stream in this process and yields the
        same triples (extract.step.run_batches: preparation goes on across task boundaries); a cluster
        runs `fn` per item."""
        if many is not None:
            yield from many(list(items), **kwargs)
            return
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
    """A dask.distributed cluster.

    - `scheduler`: the address of an existing scheduler (``tcp://host:8786``) or a scheduler file
      (``--scheduler-file`` of ``dask scheduler``; any path ending in .json).
    - otherwise a local cluster: `gpus` (ids) -> one worker per GPU; else `workers` processes with
      `threads_per_worker` torch threads each (default: the cores shared out evenly).
    """

    def __init__(self, workers: int = 1, scheduler: str | None = None, threads_per_worker: int | None = None,
                 gpus: list[str] | None = None, wait_for_workers_s: float = 600.0):
        if not logging.getLogger().isEnabledFor(logging.INFO):
            # distributed sets up its own INFO logging on import: keep it quiet unless -v
            os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        from distributed import Client

        self._cluster = None
        if scheduler:
            if scheduler.endswith(".json"):
                self.client = Client(scheduler_file=scheduler, timeout="30s", set_as_default=False)
            else:
                self.client = Client(scheduler, timeout="30s", set_as_default=False)
            if not self.client.scheduler_info().get("workers"):
                log.warning("waiting up to %.0f s for a worker to join %s", wait_for_workers_s, scheduler)
                try:
                    self.client.wait_for_workers(1, timeout=wait_for_workers_s)
                except TimeoutError:
                    self.client.close()
                    raise RuntimeError(f"no dask worker joined {scheduler} within {wait_for_workers_s:.0f} s: "
                                       "start some with `dask worker ADDRESS` (docs/scale.md)") from None
            self.threads = threads_per_worker   # None: leave the workers' own setting
            self.local_processes = None
            info = self.client.scheduler_info()["workers"]
            gpu_workers = sum(1 for w in info.values() if (w.get("resources") or {}).get(GPU, 0) >= 1)
            self.resources = {GPU: 1} if gpu_workers else None
            self.name = (f"dask scheduler {scheduler}, {len(info)} worker(s)"
                         + (f", {gpu_workers} with a GPU" if gpu_workers else ""))
        else:
            import dask

            # non-daemonic workers, so each may start its preparation processes (extract.prep); read by
            # the nannies whenever they (re)start a worker, so set for this process, not for a block
            dask.config.set({"distributed.worker.daemon": False})
            env = {"TOKENIZERS_PARALLELISM": "false"}
            for var in FORWARDED_ENV:
                if var in os.environ:
                    env[var] = os.environ[var]
            with _sigint_ignored():
                if gpus:
                    self._cluster, threads = self._gpu_cluster(gpus, env, threads_per_worker)
                    self.resources = {GPU: 1}
                    self.local_processes = len(gpus)
                    self.name = f"local dask cluster, {len(gpus)} GPU worker(s) (GPUs {','.join(gpus)})"
                else:
                    from distributed import LocalCluster

                    threads = threads_per_worker or max(1, available_cores() // max(1, workers))
                    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                    # one task at a time per worker (threads_per_worker=1): the step overlaps decoding with
                    # encoding inside the task, and torch uses `threads` cores (_in_worker).
                    self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                 host="127.0.0.1", dashboard_address=":0",
                                                 silence_logs=logging.ERROR, env=env)
                    self.name = f"local dask cluster, {workers} worker(s) x {threads} thread(s)"
                    self.local_processes = workers
            self.client = Client(self._cluster, set_as_default=False)
            self.threads = threads
            try:
                self.client.register_plugin(_sigint_plugin())
            except Exception:  # noqa: BLE001 - only the quiet Ctrl-C depends on it
                log.debug("could not register the SIGINT plugin", exc_info=True)
        self.dashboard = self.client.dashboard_link
        if self._cluster is not None and importlib.util.find_spec("bokeh") is None:
            self.dashboard += "  (not served: the dashboard needs `pip install 'bokeh>=3.1'`)"

    @staticmethod
    def _gpu_cluster(gpus: list[str], env: dict, threads_per_worker: int | None):
        """One nanny-managed worker per GPU, each seeing only its own GPU, holding resource GPU=1."""
        from distributed import Nanny, Scheduler, SpecCluster

        threads = threads_per_worker or max(1, available_cores() // len(gpus))
        workers = {
            f"gpu-{g}": {"cls": Nanny, "options": {
                "nthreads": 1, "resources": {GPU: 1},
                "env": {**env, "CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": str(threads)}}}
            for g in gpus
        }
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR,
                           name="emollama-gpu"), threads

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self.client.submit(_in_worker, fn, self.threads, *args, pure=False, resources=self.resources,
                                  **kwargs).result()

    def map_unordered(self, fn, items, *, many=None, **kwargs):
        """Submit every item as one task (in the given order, which is also dask's priority order) and
        yield (item, result, error) as each finishes anywhere in the cluster.

        A task whose worker dies is rerun on another worker by dask (up to
        distributed.scheduler.allowed-failures times), so it is reported once, when it finally ends."""
        from distributed import as_completed

        items = list(items)
        futures = {}
        for i, item in enumerate(items):
            # earlier items first: dask runs higher priority first
            fut = self.client.submit(_in_worker, fn, self.threads, item, pure=False, resources=self.resources,
                                     priority=len(items) - i, **kwargs)
            futures[fut] = item
        for fut in as_completed(futures, loop=self.client.loop):
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

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # interrupted: shut the cluster down without its cancellation noise; a second Ctrl-C while
            # closing is ignored, so the one line the CLI prints stays the only output
            for name in ("distributed", "tornado", "asyncio"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
            with _sigint_ignored():
                with contextlib.suppress(Exception):
                    self.close()
            return None
        self.close()


def make_executor(workers: int, scheduler: str | None = None, *, device: str = "auto",
                  threads: int | None = None) -> InlineExecutor:
    """The executor for a run: an existing cluster (`scheduler`), this process (`workers` 0), a local
    cluster with one worker per GPU (GPUs visible and `device` auto/cuda), or `workers` CPU workers."""
    if scheduler:
        return DaskExecutor(scheduler=scheduler, threads_per_worker=threads)
    if workers <= 0:
        return InlineExecutor()
    gpus = visible_gpus(device)
    if gpus:
        return DaskExecutor(gpus=gpus, threads_per_worker=threads)
    return DaskExecutor(workers=workers, threads_per_worker=threads)

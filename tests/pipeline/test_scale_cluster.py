"""Extraction at scale (issue 6): a local cluster of 2 workers, a cluster started separately and
reached by address, a worker killed mid-run, a store behind s3://, and how tasks are planned.

The clusters are real: worker processes started by dask (LocalCluster) or by `dask scheduler` /
`dask worker` command lines, exactly as a user's cluster would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.extract.sample import write_sample
from emollama.extract.step import ClipJob
from emollama.pipeline.cli import app
from emollama.pipeline.extraction import parse_storage_options, plan_tasks
from emollama.store import FeatureStore

runner = CliRunner()


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("scale") / "data", clips=6, seed=11)


def extract(data: Path, store: str, *extra: str, config: Path | None = None):
    args = ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store), "--profile", "tiny",
            "--no-progress", "--json", *extra]
    if config is not None:
        args += ["--config", str(config)]
    return runner.invoke(app, args)


def summary_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def no_compaction(tmp_path: Path, extra: str = "") -> Path:
    """A config file that keeps every writer's segment (so the test can see who wrote what)."""
    cfg = tmp_path / "extract.toml"
    cfg.write_text("[extract]\ncompact = false\n" + extra)
    return cfg


def writer_pids(store_dir: Path) -> set[int]:
    """The processes that committed segments (writer ids are host-pid-random)."""
    return {int(json.loads(p.read_text())["writer"].rsplit("-", 2)[1]) for p in (store_dir / "_commits").glob("*.json")}


def assert_same_values(a: FeatureStore, b: FeatureStore, ids: list[str]) -> None:
    assert set(a.sets()) == set(b.sets())
    for key in a.sets():
        for cid in ids:
            np.testing.assert_array_equal(a.read(cid, [key])[key], b.read(cid, [key])[key], err_msg=f"{key} {cid}")


# --------------------------------------------------------------------------------------- planning

def test_tasks_are_sized_by_clip_length_and_the_longest_go_first():
    jobs = [ClipJob(f"c{i}", f"/v/c{i}.mp4") for i in range(10)]
    sizes = [100] * 10
    sizes[3] = 900          # a clip 9x the median length: it travels in a smaller task
    tasks = plan_tasks(jobs, sizes, batch_clips=4)
    assert sorted(j.id for t in tasks for j in t) == sorted(j.id for j in jobs)   # every clip once
    assert all(1 <= len(t) <= 4 for t in tasks)
    long_task = next(t for t in tasks if any(j.id == "c3" for j in t))
    assert len(long_task) < 4 and tasks[0] is long_task   # 0.5 + 0.5 * 9 = 5 units: closes the task
    # equal clips: batch_clips per task, corpus order kept
    even = plan_tasks(jobs, [100] * 10, batch_clips=4)
    assert [len(t) for t in even] == [4, 4, 2] and [j.id for j in even[0]] == ["c0", "c1", "c2", "c3"]
    # unreadable sizes count as a typical clip
    assert [len(t) for t in plan_tasks(jobs[:3], [None, None, None], batch_clips=2)] == [2, 1]
    assert plan_tasks([], [], batch_clips=4) == []


def test_storage_options_from_key_value_pairs():
    opts = parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=false", "key=abc=d",
                                  'client_kwargs={"region_name": "eu-west-1"}'])
    assert opts == {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "key": "abc=d",
                    "client_kwargs": {"region_name": "eu-west-1"}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_storage_options(["endpoint_url"])


def test_a_local_cluster_gets_one_worker_per_visible_gpu(monkeypatch):
    import torch

    from emollama.pipeline.executors import InlineExecutor, make_executor, visible_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus("auto") == ["3", "5"] and visible_gpus("cuda") == ["3", "5"]
    assert visible_gpus("cpu") == [] and visible_gpus("cuda:1") == []   # one named GPU: shared, no split
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert visible_gpus() == []
    assert isinstance(make_executor(0, device="cuda"), InlineExecutor)   # --workers 0: this process


# --------------------------------------------------------------------------------------- local cluster

@pytest.mark.slow
def test_stores_are_bit_identical_across_preparation_processes_and_executors(sample_data, tmp_path, monkeypatch):
    """The same clips, extracted in process with 1 and with 2 preparation processes, and by 2 local dask
    workers into one store: every clip complete, the values equal bit for bit. Every side runs torch
    on 1 thread: a different thread count changes the order of float sums in the encoders, which fp16
    storage can turn into a one-step difference (a preparation process always runs on 1 thread)."""
    import torch

    import emollama.pipeline.executors as executors

    cfg = no_compaction(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = summary_of(extract(sample_data, tmp_path / "p1.zarr", "--workers", "0", "--prep-workers", "1",
                                 "--batch-clips", "2", config=cfg))
        two_prep = summary_of(extract(sample_data, tmp_path / "p2.zarr", "--workers", "0", "--prep-workers", "2",
                                      "--batch-clips", "4", config=cfg))
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(executors, "available_cores", lambda: 2)   # 2 workers x 1 torch thread on any machine
    two = summary_of(extract(sample_data, tmp_path / "two.zarr", "--workers", "2", "--batch-clips", "2",
                             config=cfg))
    ids = sorted(one["ok"])
    assert len(ids) == 6 and sorted(two_prep["ok"]) == ids and sorted(two["ok"]) == ids
    assert two["failed"] == [] and two["keys"] == one["keys"] == two_prep["keys"]
    a = FeatureStore.open(tmp_path / "p1.zarr")
    for other in ("p2.zarr", "two.zarr"):
        b = FeatureStore.open(tmp_path / other)
        for key in b.sets():
            assert b.complete(key) == set(ids)
        assert_same_values(a, b, ids)
        rep = b.verify()
        assert rep.ok, rep.problems
    # two processes, neither of them this one, committed the segments; each prepared its clips in
    # preparation processes of its own (non-daemonic dask workers may start them)
    pids = writer_pids(tmp_path / "two.zarr")
    assert len(pids) == 2 and os.getpid() not in pids
    assert (one["prep_workers"], two_prep["prep_workers"], two["prep_workers"]) == (1, 2, 1)


# --------------------------------------------------------------------------------------- a user's cluster

@pytest.fixture(scope="module")
def user_cluster(tmp_path_factory):
    """`dask scheduler` and `dask worker --nworkers 2` as separate processes, like a user's cluster.

    Workers inherit this environment (HF_HUB_OFFLINE, EMOLLAMA_HOME: tests/conftest.py)."""
    pytest.importorskip("distributed")
    tmp = tmp_path_factory.mktemp("cluster")
    sched_file = tmp / "scheduler.json"
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    log = open(tmp / "cluster.log", "w")
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--dashboard-address", ":0", "--scheduler-file", str(sched_file)],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                               str(sched_file), "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1",
                               "--no-dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        from distributed import Client

        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, (tmp / "cluster.log").read_text()
            time.sleep(0.2)
        with Client(scheduler_file=str(sched_file), timeout="30s", set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
        yield address, sched_file
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
        for proc in (worker, scheduler):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


@pytest.mark.slow
def test_extract_on_a_separately_started_cluster_by_address(user_cluster, sample_data, tmp_path):
    address, scheduler_file = user_cluster
    store = tmp_path / "by-address.zarr"
    out = summary_of(extract(sample_data, store, "--scheduler", address, "--batch-clips", "2",
                             "--limit", "4", config=no_compaction(tmp_path)))
    assert len(out["ok"]) == 4 and out["failed"] == []
    st = FeatureStore.open(store)
    assert all(st.complete(k) == set(out["ok"]) for k in st.sets())
    assert st.verify().ok
    # the work ran in the cluster's workers, not in this process
    pids = writer_pids(store)
    assert pids and os.getpid() not in pids
    # a rerun through the scheduler file finds everything complete
    again = summary_of(extract(sample_data, store, "--scheduler", str(scheduler_file), "--limit", "4"))
    assert again["skipped"] == 4 and again["ok"] == []


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_no_clip(user_cluster, sample_data, tmp_path):
    """SIGKILL a worker process while it runs a task, once the first task has committed: dask reruns
    the lost task on a worker that lives (the nanny also restarts the dead one), every clip completes
    and the store verifies clean (a half-written segment has no commit mark: readers never see it)."""
    from distributed import Client

    address, _ = user_cluster
    store = tmp_path / "killed.zarr"
    killed: dict = {}

    def kill_one_busy_worker():
        with Client(address, timeout="30s", set_as_default=False) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                commits = store / "_commits"
                if commits.is_dir() and any(commits.glob("*.json")):
                    busy = client.run(lambda dask_worker: (os.getpid(), len(dask_worker.state.executing)))
                    for addr, (pid, executing) in busy.items():
                        if executing:
                            os.kill(pid, signal.SIGKILL)
                            killed.update(address=addr, pid=pid)
                            break
                time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_busy_worker, daemon=True)
    watcher.start()
    out = summary_of(extract(sample_data, store, "--scheduler", address, "--batch-clips", "1"))
    watcher.join(timeout=10)
    assert killed, "no worker was busy after the first commit: nothing was killed"
    assert len(set(out["ok"])) == 6 and out["failed"] == []
    st = FeatureStore.open(store)
    assert all(len(st.complete(k)) == 6 for k in st.sets())
    rep = st.verify()
    assert rep.ok, rep.problems
    # the killed process is gone; the nanny restarted a worker in its place
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    with Client(address, timeout="30s", set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        assert killed["pid"] not in client.run(os.getpid).values()


# --------------------------------------------------------------------------------------- GPU workers

@pytest.mark.slow
def test_gpu_workers_own_one_gpu_each_and_tasks_ask_for_one():
    """The mechanics, on any machine: a local GPU cluster has one worker per GPU id, each seeing only
    its own GPU and holding resource GPU=1; an executor attached to such a cluster by address sees the
    GPU workers and submits every task with resources={"GPU": 1}."""
    from emollama.pipeline.executors import GPU, DaskExecutor

    with DaskExecutor(gpus=["0", "1"], threads_per_worker=1) as local:
        assert local.resources == {GPU: 1}
        seen = local.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        info = local.client.scheduler_info()["workers"]
        assert all(w["resources"] == {GPU: 1} for w in info.values())
        with DaskExecutor(scheduler=local.client.scheduler.address) as remote:
            assert remote.resources == {GPU: 1} and "2 with a GPU" in remote.name
            done = list(remote.map_unordered(lambda i: os.environ["CUDA_VISIBLE_DEVICES"], range(4)))
            assert sorted(i for i, _, _ in done) == [0, 1, 2, 3] and all(e is None for _, _, e in done)
            assert {r for _, r, _ in done} <= {"0", "1"}


# --------------------------------------------------------------------------------------- object storage

@pytest.mark.slow
@pytest.mark.s3
def test_store_behind_s3_with_options_from_the_config_sent_to_the_workers(user_cluster, s3_endpoint,
                                                                         sample_data, tmp_path):
    """`--store s3://...` with endpoint and keys in the config's [extract] storage_options: the
    workers of a separate cluster (no AWS variables in their environment) write through them."""
    cfg = tmp_path / "s3.toml"
    cfg.write_text(f'[extract]\nstorage_options = {{ endpoint_url = "{s3_endpoint}", key = "x", secret = "x" }}\n')
    out = summary_of(extract(sample_data, "s3://feats/cluster", "--scheduler", user_cluster[0], "--batch-clips", "2",
                             "--limit", "3", config=cfg))
    assert len(out["ok"]) == 3 and out["failed"] == []
    opts = {"endpoint_url": s3_endpoint, "key": "x", "secret": "x"}
    st = FeatureStore.open("s3://feats/cluster", create=False, storage_options=opts)
    assert len(st.sets()) == 5 and all(st.complete(k) == set(out["ok"]) for k in st.sets())
    assert st.verify().ok


@pytest.mark.slow
@pytest.mark.s3
def test_store_behind_s3_with_the_standard_aws_variables(s3_endpoint, sample_data, tmp_path, monkeypatch):
    """No options at all: AWS_ENDPOINT_URL and the AWS key variables are enough (s3fs reads them)."""
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    out = summary_of(extract(sample_data, "s3://feats/env", "--workers", "0", "--limit", "2"))
    assert len(out["ok"]) == 2
    st = FeatureStore.open("s3://feats/env", create=False)
    assert all(len(st.complete(k)) == 2 for k in st.sets()) and st.verify().ok


@pytest.mark.slow
@pytest.mark.s3
def test_store_behind_s3_with_storage_option_flags(s3_endpoint, sample_data):
    out = summary_of(extract(sample_data, "s3://feats/flags", "--workers", "0", "--limit", "1",
                             "--storage-option", f"endpoint_url={s3_endpoint}", "--storage-option", "key=x",
                             "--storage-option", "secret=x"))
    assert len(out["ok"]) == 1
    st = FeatureStore.open("s3://feats/flags", create=False,
                           storage_options={"endpoint_url": s3_endpoint, "key": "x", "secret": "x"})
    assert all(len(st.complete(k)) == 1 for k in st.sets()) and st.verify().ok
    bad = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(sample_data), "--store", "s3://feats/x",
                              "--storage-option", "no-equals-sign"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output

"""Preparation apart from encoding (extract.prep): results in order from P processes, pixels through
shared memory, processes kept between tasks, a dead process failing its task only, and the thread
fallback where a process may not have children."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import numpy as np
import pytest

from emollama.extract import prep, step
from emollama.extract.registry import FACE_CLIP, FACE_FRAMES, FRAME, WAVEFORM
from emollama.extract.sample import write_sample


def _square(item, arg):
    import torch

    time.sleep(0.05 * ((item * 7) % 3))   # uneven work: the fast worker finishes out of order
    return {"item": item, "pid": os.getpid(), "x": torch.full((64, 64), float(item * arg)),
            "threads": torch.get_num_threads()}


def test_pool_returns_results_in_order_through_shared_memory_and_keeps_its_processes():
    pool = prep.PrepPool(_square, 2, workers=2)
    try:
        first = list(pool.map(range(10)))
        assert [r["item"] for r in first] == list(range(10))          # the order asked, whatever finished first
        assert all(float(r["x"][0, 0]) == 2.0 * r["item"] for r in first)
        assert all(r["x"].is_shared() for r in first)                 # pixels came through shared memory
        assert all(r["threads"] == 1 for r in first)                  # one torch thread per process
        pids = {r["pid"] for r in first}
        assert len(pids) == 2 and os.getpid() not in pids
        second = list(pool.map([3, 1]))
        assert [r["item"] for r in second] == [3, 1]
        assert {r["pid"] for r in second} <= pids                     # the same processes serve the next task
        assert list(pool.map([])) == []
    finally:
        pool.close()


def test_a_pass_left_half_way_does_not_leak_into_the_next():
    pool = prep.PrepPool(_square, 1, workers=2, ahead=3)
    try:
        it = pool.map(range(8))
        assert [next(it)["item"] for _ in range(2)] == [0, 1]
        it.close()                                                    # the task stopped (an error) mid-way
        assert [r["item"] for r in pool.map([5, 6, 7])] == [5, 6, 7]
    finally:
        pool.close()


def test_a_pass_read_from_another_thread_forks_in_the_calling_one_and_closes_cleanly():
    """A pass may be read from another thread (a look-ahead); its workers are forked by `map`, in the
    calling thread. (Workers forked from another thread exit with status 1 when closed, and torch reported
    that as a dead worker in the next run.)"""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(2):
        pool = prep.PrepPool(_square, 1, workers=2)
        passing = pool.map(range(4))                                  # the workers start here
        workers = list(pool._loader._iterator._workers)
        assert all(w.is_alive() for w in workers)
        with ThreadPoolExecutor(1) as reader:
            assert reader.submit(lambda: [r["item"] for r in passing]).result() == [0, 1, 2, 3]
        pool.close()
        assert [w.exitcode for w in workers] == [0, 0]


def test_thread_map_keeps_order_and_reads_ahead():
    seen = []

    def fn(item, arg):
        seen.append(item)
        return item + arg

    it = prep.thread_map(fn, 10, range(6), ahead=3)
    assert next(it) == 10
    time.sleep(0.1)
    assert len(seen) >= 3                                             # the next ones were started meanwhile
    assert list(it) == [11, 12, 13, 14, 15]


def _usable_in_child(q):
    q.put(prep.usable_workers(2))


def test_a_daemonic_process_prepares_in_a_thread():
    assert prep.usable_workers(0) == 0 and prep.usable_workers(3) == 3
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_usable_in_child, args=(q,), daemon=True)   # like a default dask worker
    p.start()
    p.join(30)
    assert q.get(timeout=5) == 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[step.ClipJob]:
    data = write_sample(tmp_path_factory.mktemp("prep") / "data", clips=4, seed=5)
    videos = sorted((data / "video").glob("*.mp4"))
    return [step.ClipJob(v.stem, str(v)) for v in videos]


@pytest.fixture(scope="module")
def settings():
    from emollama.pipeline.config import load_config
    from emollama.pipeline.extraction import settings_from

    cfg = load_config(None, {"dataset": {"kind": "merr", "root": "."},
                             "extract": {"store": "unused.zarr", "profile": "tiny", "micro_batch": 2}})
    return settings_from(cfg)


def test_prepared_clips_are_the_same_from_processes_and_from_a_thread(clips, settings, tmp_path):
    m = step.models(settings)
    # processes first: a process that has run torch on another thread (the preparation thread) may not
    # fork safely afterwards (its OpenMP state: a forked worker spun in MTCNN's Linear)
    by_procs = list(step.prepared_clips(clips, dataclasses.replace(settings, prep_workers=2), m))
    by_thread = list(step.prepared_clips(clips, dataclasses.replace(settings, prep_workers=0), m))
    assert [p.job.id for p in by_procs] == [c.id for c in clips]
    for a, b in zip(by_thread, by_procs):
        assert a.error is None and b.error is None
        assert a.record == b.record
        for kind in (WAVEFORM, FACE_FRAMES, FACE_CLIP, FRAME):
            assert isinstance(b.inputs[kind], np.ndarray)
            np.testing.assert_array_equal(a.inputs[kind], b.inputs[kind], err_msg=kind)
        assert_same_sources(a, b)
    prep.close_pools()


def assert_same_sources(a, b):
    """Both prepared clips cut their face crops from the same frames with the same boxes (up to MTCNN's
    float differences between torch thread counts, far below the pixel the crops round to)."""
    assert set(a.sources) == set(b.sources) == {FACE_FRAMES, FACE_CLIP, FRAME}   # FRAME: the face square in the whole frame
    for kind in a.sources:
        x, y = a.sources[kind], b.sources[kind]
        assert x.frames == y.frames and x.states == y.states, kind
        np.testing.assert_allclose(x.boxes, y.boxes, atol=1e-3, err_msg=kind)


def _on_encoder(settings, **kw):
    return dataclasses.replace(settings, faces=dataclasses.replace(settings.faces, detect_on="encoder"), **kw)


def test_faces_tracked_on_the_encoding_side_equal_those_of_the_preparation_processes(clips, settings):
    """detect_on = "encoder": the processes only decode (the frames come through shared memory) and one
    batched MTCNN pass per face group gives the crops the processes give clip by clip (on this CPU)."""
    m = step.models(settings)
    base = list(step.prepared_clips(clips, dataclasses.replace(settings, prep_workers=2), m))
    waiting = list(step.prepared_clips(clips, _on_encoder(settings, prep_workers=2), m))
    for p in waiting:
        assert p.error is None and set(p.inputs) == {WAVEFORM} and "faces" not in p.seconds
        w = p.waiting
        assert isinstance(w.look.frames, np.ndarray) and w.look.frames.shape[0] == len(w.look.plan.wanted)
        assert isinstance(w.small, np.ndarray) and len(w.small) == len(w.look.plan.anchors)   # downscaled there
    calls = []
    real = m.detector.track_many
    m.detector.track_many = lambda frames, times, smalls, shots: calls.append(len(frames)) or \
        real(frames, times, smalls, shots)
    try:
        step.track_faces(waiting, m.detector, settings)
    finally:
        del m.detector.track_many
    assert calls == [len(clips)]            # one pass for all the clips (a face on every anchor: no second look)
    for a, b in zip(base, waiting):
        assert b.error is None and b.waiting is None and b.seconds["faces"] > 0
        assert a.record == b.record
        for kind in (WAVEFORM, FACE_FRAMES, FACE_CLIP, FRAME):
            np.testing.assert_array_equal(a.inputs[kind], b.inputs[kind], err_msg=kind)
        assert_same_sources(a, b)
    prep.close_pools()


def test_the_encoding_side_finds_faces_for_whole_micro_batches_of_at_least_face_group_clips(settings):
    assert step.FACE_GROUP == 16
    assert step.face_group(_on_encoder(settings, micro_batch=4)) == 16
    assert step.face_group(_on_encoder(settings, micro_batch=5)) == 20   # whole micro-batches
    assert step.face_group(_on_encoder(settings, micro_batch=32)) == 32
    assert step.face_group(dataclasses.replace(settings, micro_batch=4)) == 4   # prep: a micro-batch


def test_a_face_detection_error_on_the_encoding_side_fails_its_group_only(clips, settings, tmp_path, monkeypatch):
    from emollama.store import FeatureStore

    monkeypatch.setattr(step, "FACE_GROUP", 2)
    s = _on_encoder(settings, prep_workers=2)                         # micro_batch 2
    m = step.models(s)
    calls = []
    real = m.detector.track_many

    def flaky(frames, times, smalls, shots):
        calls.append(len(frames))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return real(frames, times, smalls, shots)

    store = FeatureStore.open(tmp_path / "s.zarr")
    specs = step.describe(s)
    keys = {name: store.ensure_set(spec) for name, spec in specs.items()}
    m.detector.track_many = flaky
    try:
        [(jobs, result, error)] = list(step.run_batches([clips], s, str(tmp_path / "s.zarr"), keys))
    finally:
        del m.detector.track_many
    assert error is None and calls == [2, 2]
    assert result.ok == [c.id for c in clips[2:]]
    assert result.failed == [(c.id, "face detection error: RuntimeError: CUDA out of memory") for c in clips[:2]]
    st = FeatureStore.open(tmp_path / "s.zarr")
    for key in keys.values():
        assert st.complete(key) == {c.id for c in clips[2:]}
    assert st.records()[clips[0].id]["status"] == "failed"
    # the face sets say where MTCNN ran; the audio set does not depend on it
    assert specs["local.vit_mae.mean"].params["faces"]["detect_on"] == "encoder"
    assert "detect_on" not in step.describe(settings)["local.vit_mae.mean"].params["faces"]
    assert specs["audio.hubert.mean"].key == step.describe(settings)["audio.hubert.mean"].key
    prep.close_pools()


_PREPARE = step.prepare_in_process


def _dies_on(job, settings):
    if job.id.endswith("poison"):
        os._exit(3)                       # a decoder crash takes the whole process down
    return _PREPARE(job, settings)


def test_a_dead_preparation_process_fails_its_task_only(clips, settings, tmp_path, monkeypatch):
    """A process that dies (a segfault in a decoder) fails the task it was preparing: nothing of that
    task is committed, and the next task gets a fresh pool and completes."""
    from emollama.store import FeatureStore

    s = dataclasses.replace(settings, prep_workers=2)
    monkeypatch.setattr(step, "prepare_in_process", _dies_on)   # forked processes inherit the patch
    keys = {name: FeatureStore.open(tmp_path / "s.zarr").ensure_set(spec) for name, spec in step.describe(s).items()}
    poison = step.ClipJob("x-poison", clips[0].source)
    tasks = [[clips[0], poison], [clips[1], clips[2]]]
    out = list(step.run_batches(tasks, s, str(tmp_path / "s.zarr"), keys))
    assert [jobs for jobs, _, _ in out] == tasks
    (_, r1, e1), (_, r2, e2) = out
    assert r1 is None and isinstance(e1, RuntimeError) and "exited unexpectedly" in str(e1)
    assert e2 is None and r2.ok == [clips[1].id, clips[2].id] and r2.prep_workers == 2
    st = FeatureStore.open(tmp_path / "s.zarr")
    for key in keys.values():
        assert st.complete(key) == {clips[1].id, clips[2].id}
    prep.close_pools()


def test_the_slow_device_encoder_sleeps_and_describes_its_input(clips, settings, tmp_path):
    from emollama.pipeline.config import load_config
    from emollama.pipeline.extraction import settings_from

    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    (stand_in / "README").write_text("nothing is read\n")
    cfg = load_config(None, {"dataset": {"kind": "merr", "root": "."}, "extract": {
        "store": "unused.zarr", "profile": "tiny",
        "encoders": {"local": {"encoder": "slow_device", "model": str(stand_in), "input": "face_frames",
                               "seconds": 0.2}}}})
    entry = next(e for e in settings_from(cfg).encoders if e.name == "local")
    enc = entry.load(device="cpu", offline=True)
    x = [np.full((4, 8, 8, 3), 10, np.uint8), np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)]
    t0, c0 = time.perf_counter(), time.process_time()
    out = enc.encode(x)
    assert time.perf_counter() - t0 >= 0.2                          # the wall time it stands for ...
    assert time.process_time() - c0 < 0.1                           # ... and almost no CPU
    np.testing.assert_allclose(out[0]["stats"], [10.0, 0.0])
    np.testing.assert_allclose(out[1]["stats"], [0.0, 0.0])          # every 4096th value: the first only
    big = np.arange(3 * 4096, dtype=np.float32)
    np.testing.assert_allclose(enc.encode([big])[0]["stats"], [4096.0, np.std([0, 4096, 8192])], rtol=1e-6)
    assert enc.input_kind == FACE_FRAMES and enc.outputs["stats"].shape == (2,)
    assert enc.params["options"]["seconds"] == 0.2                  # in the key: another time, another set

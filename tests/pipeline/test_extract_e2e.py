"""Stage one end to end: sample dataset -> `emollama extract` -> store, reruns, real clips."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.extract.sample import write_sample
from emollama.pipeline.cli import app
from emollama.store import FeatureStore

runner = CliRunner()

EXPECTED_VIEWS = {"audio", "local", "temporal", "global"}


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("sample") / "data", clips=6, seed=3)


def extract(data, store, *extra):
    return runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                               "--profile", "tiny", "--workers", "0", "--no-progress", "--json", *extra])


def summary_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


@pytest.mark.slow
def test_extract_sample_writes_all_four_views_then_reruns_idempotently(sample_data, tmp_path):
    store_path = tmp_path / "store.zarr"
    first = summary_of(extract(sample_data, store_path, "--preview", str(tmp_path / "preview")))
    assert first["total"] == 6 and len(first["ok"]) == 6 and first["failed"] == []

    store = FeatureStore.open(store_path)
    sets = store.sets()
    assert {spec.modality for spec in sets.values()} == EXPECTED_VIEWS
    by_name = {spec.name: (key, spec) for key, spec in sets.items()}
    assert set(by_name) == {"audio.hubert.frames", "audio.hubert.mean", "local.vit_mae.mean",
                            "temporal.videomae.mean", "global.eva.tokens"}
    ids = sorted(first["ok"])
    for name, (key, spec) in by_name.items():
        assert store.complete(key) == set(ids), name
        arr = store.read(ids[0], [key])[key]
        assert arr.dtype == np.float16 and np.isfinite(arr).all()
        if spec.shape[0] is None:
            assert arr.shape[1:] == spec.shape[1:] and 40 <= arr.shape[0] <= 120   # ~2 s of audio at 50 Hz
        else:
            assert arr.shape == spec.shape
    assert by_name["global.eva.tokens"][1].shape[0] == 1025
    records = store.records()
    assert all(records[i]["status"] == "ok" and records[i]["face_found"] for i in ids)
    assert len(list((tmp_path / "preview").glob("*.png"))) == 6

    # A rerun recomputes nothing.
    again = summary_of(extract(sample_data, store_path))
    assert again["skipped"] == 6 and again["ok"] == [] and again["failed"] == []

    # Remove one clip's features: only that clip is recomputed, to the same values.
    key = by_name["local.vit_mae.mean"][0]
    before = store.read(ids[2], [key])[key]
    assert store.remove([ids[2]], [key]) >= 1
    third = summary_of(extract(sample_data, store_path))
    assert third["ok"] == [ids[2]] and third["skipped"] == 5
    store.refresh()
    np.testing.assert_array_equal(store.read(ids[2], [key])[key], before)
    assert store.verify().ok


def test_bad_clips_are_recorded_and_the_run_goes_on(sample_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    names = [line.split()[0] for line in (data / "MERR_coarse_grained.txt").read_text().splitlines()]
    (data / "video" / f"{names[0]}.mp4").write_bytes(b"this is not a video")
    (data / "video" / f"{names[1]}.mp4").write_bytes(b"")
    store_path = tmp_path / "store.zarr"
    result = extract(data, store_path, "--limit", "3")
    assert result.exit_code == 1, result.output           # failures -> non-zero exit
    out = json.loads(result.output[result.output.index("{"):])
    assert sorted(i for i, _ in out["failed"]) == sorted(names[:2]) and out["ok"] == [names[2]]
    failures = FeatureStore.open(store_path).failures()
    assert set(failures) == set(names[:2]) and all(failures.values())

    # Fix one clip and rerun: only the failed clips are retried.
    shutil.copy(sample_data / "video" / f"{names[0]}.mp4", data / "video" / f"{names[0]}.mp4")
    result = extract(data, store_path, "--limit", "3")
    out = json.loads(result.output[result.output.index("{"):])
    assert out["ok"] == [names[0]] and [i for i, _ in out["failed"]] == [names[1]] and out["skipped"] == 1


def test_faces_detected_on_the_encoding_side_are_keyed_recorded_and_rebuilt_by_eval(sample_data, tmp_path):
    """--detect-on encoder: MTCNN runs per face group in the encoding process. The face sets' keys and the
    recorded config say so (eval re-extracts the same way); the audio set is the same set as by default."""
    from emollama.pipeline.features import extraction_config

    runs = {}
    for how in ("auto", "encoder"):
        path = tmp_path / f"{how}.zarr"
        out = summary_of(extract(sample_data, path, "--limit", "2", "--detect-on", how))
        assert len(out["ok"]) == 2 and out["detect_on"] == ("prep" if how == "auto" else how)   # no GPU here
        runs[how] = (FeatureStore.open(path), out["keys"])
    (plain, kp), (enc, ke) = runs["auto"], runs["encoder"]
    assert ke["audio.hubert.mean"] == kp["audio.hubert.mean"]
    for name in ("local.vit_mae.mean", "temporal.videomae.mean", "global.eva.tokens"):
        assert ke[name] != kp[name]
        assert enc.sets()[ke[name]].params["faces"]["detect_on"] == "encoder"
        assert "detect_on" not in plain.sets()[kp[name]].params["faces"]
        ids = sorted(enc.complete(ke[name]))
        for cid in ids:   # on this CPU the batched pass finds the same boxes as clip by clip
            np.testing.assert_array_equal(enc.read(cid, [ke[name]])[ke[name]], plain.read(cid, [kp[name]])[kp[name]])
    assert extraction_config(enc, [ke["local.vit_mae.mean"]]).extract.faces.detect_on == "encoder"
    assert extraction_config(plain, [kp["local.vit_mae.mean"]]).extract.faces.detect_on == "prep"
    # a set recorded before the setting existed detected clip by clip
    key = kp["local.vit_mae.mean"]
    attrs = plain.set_attrs(key)
    del attrs["config"]["extract"]["faces"]["detect_on"]
    plain.set_attrs = lambda k: attrs
    assert extraction_config(plain, [key]).extract.faces.detect_on == "prep"


def test_invalid_config_lists_every_problem(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[dataset]\nkind = "nope"\n[extract]\nglobal_frame = "last"\nworkers = -1\nbogus = 1\n')
    result = runner.invoke(app, ["extract", "--config", str(cfg)])
    assert result.exit_code == 2
    for needle in ("dataset.kind", "dataset.root", "extract.store", "global_frame", "workers", "bogus"):
        assert needle in result.output, needle


def test_every_command_has_help():
    for cmd in (["--help"], ["extract", "--help"], ["sample", "--help"], ["store", "--help"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0 and "Usage" in result.output, cmd


@pytest.mark.slow
@pytest.mark.samples
def test_real_clips_get_all_four_views_with_faces(samples_dir, tmp_path):
    store_path = tmp_path / "real.zarr"
    result = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(samples_dir), "--store",
                                 str(store_path), "--profile", "tiny", "--workers", "0", "--no-progress",
                                 "--json", "--preview", str(tmp_path / "preview")])
    out = summary_of(result)
    assert len(out["ok"]) == 10 and out["failed"] == [] and out["no_face"] == []
    store = FeatureStore.open(store_path)
    for key in store.sets():
        assert len(store.complete(key)) == 10
    records = store.records()
    assert all(r["face_found"] and r["face_frames"] >= 0.25 * r["sampled_frames"] for r in records.values())
    # (one clip is a face looking down most of the time: its other frames borrow the nearest box)
    detected = sum(r["face_frames"] for r in records.values()) / sum(r["sampled_frames"] for r in records.values())
    assert detected >= 0.8
    assert len(list((tmp_path / "preview").glob("*.png"))) == 10


def test_frame_plan_decodes_each_frame_once_and_maps_views():
    from emollama.extract.step import FrameSettings, frame_plan

    for mode in ("peak", "first", "middle"):
        wanted, local, temporal = frame_plan(100, FrameSettings(global_frame=mode))
        assert wanted == sorted(set(wanted))
        assert len(local) == 16 and len(temporal) == 16
        pairs = [wanted[p] for p in temporal]
        assert all(b == a + 1 for a, b in zip(pairs[::2], pairs[1::2]))   # consecutive frames
        assert [wanted[p] for p in local] == sorted(wanted[p] for p in local)
        if mode == "first":
            assert 0 in wanted
        if mode == "middle":
            assert 49 in wanted


@pytest.mark.slow
def test_frame_folders_and_silent_videos(sample_data, tmp_path):
    """DFEW-style frame folders have no sound: silence is encoded and recorded; a video without an
    audio stream fails with its reason unless --missing-audio silence is asked for."""
    import av

    from emollama.extract import decode

    clip = sorted((sample_data / "video").glob("*.mp4"))[0]
    frames = decode.read_frames(clip, list(range(20)))
    root = tmp_path / "dfew"
    folder = root / "Clip" / "clip_224x224" / "00001"
    folder.mkdir(parents=True)
    from PIL import Image

    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i + 1:05d}.jpg")
    for split in ("train", "test"):
        d = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)"
        d.mkdir(parents=True)
        (d / "set_1.csv").write_text("video_name,label\n" + ("1,6\n" if split == "test" else ""))
    result = runner.invoke(app, ["extract", "--dataset", "dfew", "--data", str(root), "--fold", "1", "--store",
                                 str(tmp_path / "dfew.zarr"), "--profile", "tiny", "--workers", "0",
                                 "--no-progress", "--json"])
    out = summary_of(result)
    assert out["ok"] == ["00001"]
    rec = FeatureStore.open(tmp_path / "dfew.zarr").records()["00001"]
    assert rec["audio"].startswith("silence") and rec["frames"] == 20

    # the same frames as a video without sound
    videos = tmp_path / "silent"
    videos.mkdir()
    with av.open(str(videos / "mute.mp4"), "w") as out_c:
        s = out_c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out_c.mux(pkt)
        for pkt in s.encode():
            out_c.mux(pkt)
    args = ["extract", "--dataset", "folder", "--data", str(videos), "--store", str(tmp_path / "mute.zarr"),
            "--profile", "tiny", "--workers", "0", "--no-progress", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "no audio stream" in FeatureStore.open(tmp_path / "mute.zarr").failures()["mute"]
    out = summary_of(runner.invoke(app, args + ["--missing-audio", "silence"]))
    assert out["ok"] == ["mute"]


def test_offline_missing_checkpoint_fails_at_once_naming_it(sample_data, tmp_path, monkeypatch):
    import emollama.pipeline.extraction as extraction

    def no_workers(*a, **kw):  # "at once": before any worker starts or any clip is decoded
        raise AssertionError("an executor was started for a run whose weights are missing")

    monkeypatch.setattr(extraction, "make_executor", no_workers)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    result = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(sample_data), "--store",
                                 str(tmp_path / "s.zarr"), "--profile", "paper", "--workers", "1"])
    assert result.exit_code == 2, result.output
    assert "TencentGameMate/chinese-hubert-large" in result.output and "hf download" in result.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_dask_workers_write_the_same_values_as_in_process(sample_data, tmp_path):
    inline = summary_of(extract(sample_data, tmp_path / "a.zarr"))
    result = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(sample_data), "--store",
                                 str(tmp_path / "b.zarr"), "--profile", "tiny", "--workers", "2",
                                 "--batch-clips", "2", "--no-progress", "--json"])
    dask = summary_of(result)
    assert sorted(dask["ok"]) == sorted(inline["ok"]) and dask["keys"] == inline["keys"]
    a, b = FeatureStore.open(tmp_path / "a.zarr"), FeatureStore.open(tmp_path / "b.zarr")
    assert b.verify().ok
    # Workers run torch on 1 thread, this process on 2: float sums may differ in their last bit,
    # which fp16 storage can turn into one fp16 step.
    for key in a.sets():
        for cid in inline["ok"]:
            x, y = a.read(cid, [key])[key].astype(np.float32), b.read(cid, [key])[key].astype(np.float32)
            np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-6)


def test_config_file_names_a_local_folder_per_encoder(tmp_path):
    from emollama.extract.encoders import profile
    from emollama.pipeline.config import load_config
    from emollama.pipeline.extraction import settings_from

    tiny = profile("tiny")
    copy = tmp_path / "my-hubert"
    shutil.copytree(tiny.source("audio").model, copy)
    (tmp_path / "data").mkdir()
    cfg_file = tmp_path / "extract.toml"
    cfg_file.write_text(f'[dataset]\nkind = "folder"\nroot = "{tmp_path / "data"}"\n'
                        f'[extract]\nstore = "{tmp_path / "s.zarr"}"\nprofile = "tiny"\nglobal_frame = "middle"\n'
                        f'[extract.encoders.audio]\nmodel = "{copy}"\n')
    cfg = load_config(cfg_file, {"extract": {"workers": 0}})
    settings = settings_from(cfg)
    assert settings.encoders.source("audio").model == str(copy)
    assert settings.encoders.source("local") == tiny.source("local")
    assert settings.frames.global_frame == "middle" and cfg.extract.workers == 0

"""`emollama store info` summarizes the faces of a store's clips from their records: no face, a weak
track (extract.faces.is_weak), several shots, and clips extracted before the counts were recorded."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from emollama.extract.faces import WEAK_ABSENT, is_weak
from emollama.pipeline.cli_store import store_app
from emollama.store import FeatureStore, FeatureSpec

runner = CliRunner()
LOCAL = FeatureSpec("local.test.mean", "local", "vit_mae", "sha256:00", "last_hidden_state", "mean", (4,))


def face(detected: int, interpolated: int, absent: int, shots: int = 1, found: bool = True) -> dict:
    return {"face_found": found, "face_detected": detected, "face_interpolated": interpolated,
            "face_absent": absent, "face_frames": detected + interpolated,
            "sampled_frames": detected + interpolated + absent, "shots": shots, "face_span": [0, 99]}


def test_store_info_names_the_clips_with_no_face_a_weak_track_or_several_shots(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = FeatureStore.open(url)
    key = st.ensure_set(LOCAL)
    records = {
        "good": face(9, 15, 0),
        "cut": face(9, 10, 5, shots=2),                 # a second shot without the main face: not weak
        "bowed": face(4, 7, 13),                        # absent in 13 of 24 frames: weak
        "cut-weak": face(3, 2, 19, shots=3),
        "none": face(0, 0, 24, found=False),            # no face: listed as such, not as weak
        "old": {"face_found": True, "face_frames": 24, "sampled_frames": 24},   # before the counts
    }
    with st.writer() as w:
        for clip, rec in records.items():
            w.add(clip, {key: np.zeros(4, np.float32)}, rec)
        w.fail("broken", "decode error: no video stream")
    assert WEAK_ABSENT == 0.5 and is_weak(4, 7, 13) and not is_weak(9, 10, 5) and not is_weak(4, 8, 12)

    res = runner.invoke(store_app, ["info", url, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["faces"] == {
        "clips": 6, "no_face": ["none"], "weak_track": ["bowed", "cut-weak"], "several_shots": ["cut", "cut-weak"],
        "without_counts": 1, "weak_absent": 0.5}

    text = runner.invoke(store_app, ["info", url]).output
    assert ("faces    6 clips: 1 with no face (whole frames used), 2 with a weak track (the main face absent in "
            "more than 50% of the frames), 2 with several shots; 1 extracted before the counts were recorded") in text
    assert "  no face: none\n" in text and "  weak track: bowed, cut-weak\n" in text
    assert "  several shots: cut, cut-weak\n" in text


def test_store_info_says_nothing_of_faces_for_a_store_without_face_records(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = FeatureStore.open(url)
    key = st.ensure_set(LOCAL)
    with st.writer() as w:
        w.add("imported", {key: np.zeros(4, np.float32)})
    assert json.loads(runner.invoke(store_app, ["info", url, "--json"]).output)["faces"]["clips"] == 0
    assert "faces" not in runner.invoke(store_app, ["info", url]).output

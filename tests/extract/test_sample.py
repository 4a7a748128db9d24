"""The synthetic sample dataset: files, formats, balance, split, decodable media, detectable faces,
a label that can be heard, determinism."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from emollama.extract.decode import probe, read_audio, read_frames, uniform_indices
from emollama.extract.faces import FaceDetector
from emollama.extract.sample import LABELS, write_sample

N_CLIPS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "data"
    return write_sample(root, clips=N_CLIPS, seed=7)


def read_ncev(path: Path) -> list[tuple[str, int, str, float]]:
    rows = []
    for line in path.read_text().splitlines():
        name, frames, label, valence = line.split(" ")
        rows.append((name, int(frames), label, float(valence)))
    return rows


def test_layout_and_formats(sample):
    root = sample
    videos = sorted(p.stem for p in (root / "video").glob("*.mp4"))
    assert videos == [f"sample_{i:08d}" for i in range(1, N_CLIPS + 1)]
    coarse = read_ncev(root / "MERR_coarse_grained.txt")
    fine = read_ncev(root / "MERR_fine_grained.txt")
    assert [r[0] for r in coarse] == videos
    assert set(r[0] for r in fine) <= set(videos)
    assert all(r[1] == 50 and r[2] in LABELS for r in coarse)
    labels = {r[0]: r[2] for r in coarse}

    cj = json.loads((root / "MERR_coarse_grained.json").read_text())
    fj = json.loads((root / "MERR_fine_grained.json").read_text())
    assert set(cj) == set(videos) and set(fj) == {r[0] for r in fine}
    for name, rec in cj.items():
        assert set(rec) >= {"caption", "pseu_emotion", "AU_list", "visual_prior_list", "audio_prior_list",
                            "peak_index", "text"}
        assert rec["pseu_emotion"] == labels[name]
        assert labels[name] in rec["caption"]
        assert 0 <= rec["peak_index"] < 50
        assert rec["visual_prior_list"] and rec["audio_prior_list"]
    for name, rec in fj.items():
        assert labels[name] in rec["smp_reason_caption"] and len(rec["smp_reason_caption"]) > 80

    with open(root / "transcription_en_all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == videos
    for r in rows:
        assert r["sentence"] == cj[r["name"]]["text"]
        words = {w.strip(".,?!").lower() for w in r["sentence"].split()}
        assert not words & set(LABELS), r["sentence"]  # the subtitle does not give the label away

    readme = (root / "README.md").read_text().lower()
    assert "synthetic" in readme and "license" in readme


def test_labels_balanced_and_split_stratified(sample):
    root = sample
    labels = {r[0]: r[2] for r in read_ncev(root / "MERR_coarse_grained.txt")}
    assert Counter(labels.values()) == {lab: N_CLIPS // 6 for lab in LABELS}
    with open(root / "split.csv", newline="") as f:
        split = {r["name"]: r["split"] for r in csv.DictReader(f)}
    assert split.keys() == labels.keys() and set(split.values()) == {"train", "test"}
    for lab in LABELS:
        parts = Counter(split[n] for n, l in labels.items() if l == lab)
        assert parts == {"train": 1, "test": 1}, lab


def test_split_fraction_with_more_clips(tmp_path):
    root = write_sample(tmp_path / "d", clips=24, seed=1, seconds=0.4)
    with open(root / "split.csv", newline="") as f:
        split = {r["name"]: r["split"] for r in csv.DictReader(f)}
    labels = {r[0]: r[2] for r in read_ncev(root / "MERR_coarse_grained.txt")}
    assert Counter(split.values()) == {"train": 18, "test": 6}
    for lab in LABELS:
        assert Counter(split[n] for n, l in labels.items() if l == lab) == {"train": 3, "test": 1}
    assert all(r[1] == 10 for r in read_ncev(root / "MERR_coarse_grained.txt"))


def test_videos_decode_with_both_streams(sample):
    root = sample
    for mp4 in sorted((root / "video").glob("*.mp4"))[:4]:
        info = probe(mp4)
        assert (info.width, info.height, info.fps, info.n_frames) == (320, 240, 25.0, 50)
        assert info.duration == pytest.approx(2.0, abs=0.05)
        assert info.has_audio and info.audio_rate == 44100
        audio = read_audio(mp4)
        assert abs(len(audio) - 32000) < 0.05 * 16000
        assert 0.2 < np.abs(audio).max() <= 1.0
        frames = read_frames(mp4, [0, 49], info=info)
        assert frames.shape == (2, 240, 320, 3)
        assert not np.array_equal(frames[0], frames[1])  # the face moves


@pytest.mark.slow
def test_mtcnn_detects_the_drawn_face(sample):
    root = sample
    detector = FaceDetector()
    hits, total = 0, 0
    for mp4 in sorted((root / "video").glob("*.mp4")):
        track = detector.track(read_frames(mp4, uniform_indices(50, 6)))
        assert track.found, mp4.name
        hits += int(track.detected.sum())  # frames where the tracked face itself was detected
        total += len(track.detected)
    assert hits / total >= 0.8, f"face detected in {hits}/{total} frames"


def _pitch(audio: np.ndarray, sr: int = 16000) -> float:
    """Median f0 (autocorrelation) over the loud 40 ms windows."""
    win = int(0.04 * sr)
    level = np.abs(audio).max()
    f0s = []
    for i in range(0, len(audio) - win, win // 2):
        x = audio[i:i + win]
        if np.abs(x).max() < 0.3 * level:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[win - 1:]
        lo, hi = sr // 400, sr // 70
        f0s.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(f0s))


def test_the_label_can_be_heard(sample):
    root = sample
    labels = {r[0]: r[2] for r in read_ncev(root / "MERR_coarse_grained.txt")}
    pitch: dict[str, list[float]] = {lab: [] for lab in LABELS}
    for name, lab in labels.items():
        pitch[lab].append(_pitch(read_audio(root / "video" / f"{name}.mp4")))
    mean = {lab: np.mean(v) for lab, v in pitch.items()}
    assert min(mean["happy"], mean["surprise"]) > max(mean["sad"], mean["neutral"]) * 1.3, mean
    assert mean["sad"] < 150 and mean["happy"] > 180, mean


def test_deterministic_for_a_seed(tmp_path):
    a = write_sample(tmp_path / "a", clips=3, seed=5, seconds=0.4)
    b = write_sample(tmp_path / "b", clips=3, seed=5, seconds=0.4)
    c = write_sample(tmp_path / "c", clips=3, seed=6, seconds=0.4)
    for f in ["MERR_coarse_grained.txt", "MERR_coarse_grained.json", "MERR_fine_grained.json",
              "transcription_en_all.csv", "split.csv", "video/sample_00000001.mp4"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "video/sample_00000001.mp4").read_bytes() != (c / "video/sample_00000001.mp4").read_bytes()


def test_bad_arguments():
    with pytest.raises(ValueError, match="clips"):
        write_sample(Path("unused"), clips=0)
    with pytest.raises(ValueError, match="even"):
        write_sample(Path("unused"), clips=1, size=(321, 240))

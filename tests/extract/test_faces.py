"""Faces: tracking logic on constructed detections, MTCNN on drawn and real faces, peak selection.

Tracking, interpolation and batching are tested with a stand-in for MTCNN (`FakeMTCNN`: constructed
boxes, drawn coloured faces), so they are exact and fast; MTCNN itself on drawn and real faces."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emollama.extract.decode import probe, read_frames, uniform_indices
from emollama.extract.faces import (
    FaceDetector,
    FaceSettings,
    FaceTrack,
    appearance,
    detection_frames,
    crop,
    detect_positions,
    fill_boxes,
    peak_frame_index,
    peak_index,
    refine_positions,
    square_box,
    track_boxes,
)
from emollama.extract.sample import render_frames
from emollama.extract.step import TEMPORAL_PER_SEGMENT, FrameSettings, frame_plan

SAMPLES = Path(__file__).resolve().parents[2] / "../shared/samples/mer2023-examples"
TODAY = FaceSettings(detect_every=1, track_by="position")   # the face settings before detect_every and appearance


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def boxes(*bs) -> np.ndarray:
    return np.array(bs, float).reshape(-1, 4)


# ---------------------------------------------------------------- settings and geometry


def test_settings_to_dict_is_json():
    d = FaceSettings().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {"detector": "mtcnn", "crop_size": 224, "margin": 0.2, "min_face_size": 20,
                 "thresholds": [0.6, 0.7, 0.7], "detect_side": 640, "detect_every": 3, "track_by": "appearance",
                 "appearance_min": 0.7, "detect_on": "auto"}


def test_square_box_adds_margin_and_squares():
    sq = square_box(np.array([10, 20, 50, 100]), 0.2)  # 40 x 80 box, centre (30, 60)
    assert np.allclose(sq, [30 - 56, 60 - 56, 30 + 56, 60 + 56])  # side 80 * 1.4


def test_unknown_detector_is_rejected():
    with pytest.raises(ValueError, match="mtcnn"):
        FaceDetector(FaceSettings(detector="openface"))
    with pytest.raises(ValueError, match="track_by"):
        FaceDetector(FaceSettings(track_by="luck"))
    with pytest.raises(ValueError, match="detect_every"):
        FaceDetector(FaceSettings(detect_every=0))


# ---------------------------------------------------------------- tracking


def test_track_follows_the_main_face_not_the_largest_per_frame():
    main = [[100, 100, 160, 170], [104, 100, 164, 170], [108, 102, 168, 172], [112, 104, 172, 174]]
    other_big = [400, 50, 520, 190]  # a larger face, appearing in frames 1-2 only, with lower confidence
    per_frame = [boxes(main[0]), boxes(other_big, main[1]), boxes(main[2], other_big), boxes(main[3])]
    probs = [np.array([0.999]), np.array([0.97, 0.999]), np.array([0.999, 0.97]), np.array([0.999])]
    got, detected = track_boxes(per_frame, probs)
    assert np.allclose(got, main)
    assert detected.all()


def test_track_seeds_on_the_largest_confident_face():
    small = [100, 100, 140, 150]
    large = [300, 100, 400, 220]
    per_frame = [boxes(small, large)] * 3
    probs = [np.array([0.999, 0.995])] * 3
    got, _ = track_boxes(per_frame, probs)
    assert np.allclose(got, [large] * 3)


def test_missing_frames_borrow_the_nearest_detected_box():
    a, b = [100, 100, 160, 170], [110, 100, 170, 170]
    far = [500, 400, 540, 440]  # too far from the track: not the same face
    per_frame = [boxes(), boxes(a), boxes(far), boxes(), boxes(), boxes(b), boxes()]
    probs = [np.zeros(0), np.array([0.999]), np.array([0.999]), np.zeros(0), np.zeros(0), np.array([0.999]), np.zeros(0)]
    got, detected = track_boxes(per_frame, probs)
    assert detected.tolist() == [False, True, False, False, False, True, False]
    assert np.allclose(got[[0, 2, 3]], [a] * 3)  # frame 3 is 2 from frame 1 and 2 from frame 5: earlier wins
    assert np.allclose(got[[4, 6]], [b] * 2)


def test_track_without_any_face_raises():
    with pytest.raises(ValueError, match="no face"):
        track_boxes([boxes(), boxes()], [np.zeros(0), np.zeros(0)])


def test_track_without_any_face_raises_with_looks_too():
    with pytest.raises(ValueError, match="no face"):
        track_boxes([boxes(), boxes()], [np.zeros(0), np.zeros(0)], [[], []], 0.7)


# ---------------------------------------------------------------- fewer detections, interpolation


def test_detect_positions_take_every_kth_frame_and_the_last():
    assert detect_positions(10, 3) == [0, 3, 6, 9]
    assert detect_positions(8, 3) == [0, 3, 6, 7]
    assert detect_positions(5, 1) == [0, 1, 2, 3, 4]
    assert detect_positions(1, 4) == [0]
    assert detect_positions(0, 2) == []
    with pytest.raises(ValueError, match="at least 1"):
        detect_positions(5, 0)


def test_boxes_between_detected_frames_are_interpolated_in_time():
    times = [0, 2, 3, 8, 10]   # frame indices of the anchors: not evenly spaced
    b0, b2, b4 = np.array([10., 20, 50, 70]), np.array([40., 20, 80, 76]), np.array([110., 48, 180, 125])
    got, detected = fill_boxes(times, [0, 2, 4], np.stack([b0, b2, b4]), np.array([True, True, True]))
    assert detected.all()
    assert np.array_equal(got[[0, 2, 4]], [b0, b2, b4])
    assert np.allclose(got[1], b0 + (2 / 3) * (b2 - b0))    # t = 2 between t = 0 and t = 3
    assert np.allclose(got[3], b2 + (5 / 7) * (b4 - b2))    # t = 8 between t = 3 and t = 10


def test_a_frame_next_to_a_failed_detection_borrows_like_today():
    b0, b4 = np.array([10., 20, 50, 70]), np.array([60., 20, 100, 70])
    # the track was not found in sampled frame 2: track_boxes lent it frame 0's box (the earlier on a tie)
    got, detected = fill_boxes(range(5), [0, 2, 4], np.stack([b0, b0, b4]), np.array([True, False, True]))
    assert detected.tolist() == [True, False, False, False, True]
    assert np.array_equal(got, [b0, b0, b0, b4, b4])   # nearest found frame, the earlier on a tie


def test_every_frame_sampled_leaves_the_track_as_it_is():
    b = np.array([[10., 20, 50, 70], [12, 20, 52, 70], [12, 20, 52, 70], [16, 22, 56, 72]])
    got, detected = fill_boxes(range(4), range(4), b.copy(), np.array([True, True, False, True]))
    assert np.array_equal(got, b) and detected.tolist() == [True, True, False, True]


def test_refine_where_the_track_is_lost_or_moves():
    steady = np.array([100., 100, 160, 170])
    bx = np.stack([steady, steady + 2, steady + 2, steady + 2, steady + [40, 0, 40, 0]])
    # 0-3: steady (no refine); 3-6: frame 6 lost; 6-9: lost too; 9-11: the centre moves 38/70 > 0.2 of the size
    got = refine_positions([0, 3, 6, 9, 11], bx, np.array([True, True, False, True, True]))
    assert got == [4, 5, 7, 8, 10]
    assert refine_positions([0, 3, 6, 9, 11], bx, np.ones(5, bool)) == [10]
    grown = np.stack([steady, [90., 90, 170, 180]])   # the size grows by 90/70 - 1 > 0.2
    assert refine_positions([0, 2], grown, np.ones(2, bool)) == [1]
    assert refine_positions([0, 1], bx[:2], np.array([True, False])) == []   # nothing between


# ---------------------------------------------------------------- the tracker with a stand-in for MTCNN


class FakeMTCNN:
    """MTCNN's `detect` on constructed faces: frame k (its index in pixel [0, 0, 0]) has `table[k]`,
    a list of (box, probability). Records the frame indices of each call."""

    def __init__(self, table: dict[int, list]):
        self.table = table
        self.calls: list[list[int]] = []

    def detect(self, batch):
        out_b, out_p, seen = [], [], []
        for f in batch:
            k = int(f[0, 0, 0])
            seen.append(k)
            faces = self.table.get(k, [])
            out_b.append(np.array([b for b, _ in faces], float) if faces else None)
            out_p.append(np.array([p for _, p in faces]) if faces else [None])
        self.calls.append(seen)
        return out_b, out_p


COLOURS = {"A": (210, 70, 60), "B": (60, 80, 210), "C": (60, 200, 80)}   # a red, a blue and a green "face"


def scene(faces_at: list[dict[str, list]], size=(240, 320)) -> tuple[np.ndarray, dict[int, list]]:
    """Frames with each face drawn as a filled box of its colour, and the table FakeMTCNN answers with.
    faces_at[k]: face name -> [x1, y1, x2, y2] (probability 0.999)."""
    frames = np.full((len(faces_at), *size, 3), 100, np.uint8)
    table = {}
    for k, faces in enumerate(faces_at):
        for name, (x1, y1, x2, y2) in faces.items():
            frames[k, y1:y2, x1:x2] = COLOURS[name]
        frames[k, 0, 0, 0] = k
        table[k] = [(list(map(float, b)), 0.999) for b in faces.values()]
    return frames, table


def fake_detector(table, **settings) -> FaceDetector:
    return use_fake(FaceDetector(FaceSettings(**settings)), table)


def use_fake(det: FaceDetector, table) -> FaceDetector:
    det.mtcnn = FakeMTCNN(table)
    det.mtcnn_detect = det.mtcnn.detect
    return det


def raw_boxes(track: FaceTrack, margin: float = 0.2) -> np.ndarray:
    """The detection boxes behind a track's squares (square_box undone for square inputs)."""
    side = (track.boxes[:, 2] - track.boxes[:, 0]) / (1 + 2 * margin)
    c = (track.boxes[:, :2] + track.boxes[:, 2:]) / 2
    return np.concatenate([c - side[:, None] / 2, c + side[:, None] / 2], axis=1)


def test_detect_every_1_by_position_is_the_tracking_before_this_change():
    a, far = [40, 40, 100, 100], [250, 160, 290, 200]
    faces_at = [{}, {"A": a}, {"C": far}, {}, {"A": [44, 40, 104, 100]},
                {"A": [48, 42, 108, 102], "B": [180, 40, 260, 120]}]
    frames, table = scene(faces_at)
    det = fake_detector(table, detect_every=1, track_by="position")
    track = det.track(frames)
    assert det.mtcnn.calls == [list(range(6))]   # every frame, one batched call
    per_frame = [np.array([b for b, _ in table[k]], float).reshape(-1, 4) for k in range(6)]
    probs = [np.array([p for _, p in table[k]]) for k in range(6)]
    raw, detected = track_boxes(per_frame, probs)   # the tracking as it was: position only, largest seed
    assert np.array_equal(track.detected, detected)
    assert np.array_equal(track.boxes, np.stack([square_box(b, 0.2) for b in raw]))
    assert np.array_equal(track.crops, np.stack([crop(f, square_box(b, 0.2), 224) for f, b in zip(frames, raw)]))


def test_detect_every_k_runs_mtcnn_on_fewer_frames_and_interpolates():
    faces_at = [{"A": [40 + 3 * k, 50, 100 + 3 * k, 110]} for k in range(10)]   # moving right, linearly
    frames, table = scene(faces_at)
    det = fake_detector(table, detect_every=3)
    track = det.track(frames)
    assert det.mtcnn.calls == [[0, 3, 6, 9]]
    assert det.work.frames == 4 and det.work.pixels == 4 * 240 * 320
    assert track.detected.all()
    assert np.allclose(raw_boxes(track), [b["A"] for b in faces_at])   # linear motion: exact


def test_detect_every_k_detects_again_where_the_track_is_lost():
    faces_at = [{"A": [40 + 2 * k, 50, 100 + 2 * k, 110]} for k in range(10)]
    faces_at[6] = {}   # no face in frame 6
    frames, table = scene(faces_at)
    det = fake_detector(table, detect_every=3)
    track = det.track(frames)
    assert det.mtcnn.calls == [[0, 3, 6, 9], [4, 5, 7, 8]]   # the frames around 6, in a second pass
    assert track.detected.tolist() == [True] * 6 + [False] + [True] * 3
    every = fake_detector(table, detect_every=1).track(frames)
    assert np.allclose(track.boxes, every.boxes)


def test_track_many_batches_clips_and_equals_one_clip_at_a_time():
    faces_a = [{"A": [40 + 3 * k, 50, 100 + 3 * k, 110]} for k in range(7)]
    faces_b = [{"B": [150, 60 + 2 * k, 210, 120 + 2 * k]} for k in range(5)]
    fa, table = scene(faces_a)
    fb, table_b = scene(faces_b)
    fb[:, 0, 0, 0] += 7   # distinct frame ids for the fake
    table.update({k + 7: v for k, v in table_b.items()})
    fc = fa[:4, :200, :300]   # another size: its own MTCNN call
    det = fake_detector(table, detect_every=2)
    tracks = det.track_many([fa, fb, fc], [None, [0, 1, 2, 5, 6], None])
    assert det.mtcnn.calls == [[0, 2, 4, 6, 7, 9, 11], [0, 2, 3]]   # the first two clips in one call
    alone = fake_detector(table, detect_every=2)
    for got, frames, times in zip(tracks, [fa, fb, fc], [None, [0, 1, 2, 5, 6], None]):
        want = alone.track(frames, times)
        assert np.array_equal(got.boxes, want.boxes) and np.array_equal(got.crops, want.crops)
    assert np.allclose(raw_boxes(tracks[1])[3], [150, 67, 210, 127])   # t = 5: 3/4 of the way from t = 2 to 6
    # the CPU work around MTCNN on threads, one clip each: the same calls and the same tracks
    threaded = FaceDetector(FaceSettings(detect_every=2), threads=3)
    use_fake(threaded, table)
    assert {n.split("_")[0] for n in threaded.each(lambda _: threading.current_thread().name, range(3))} == {"faces"}
    again = threaded.track_many([fa, fb, fc], [None, [0, 1, 2, 5, 6], None])
    assert threaded.mtcnn.calls == det.mtcnn.calls
    for got, want in zip(again, tracks):
        for field in ("boxes", "crops", "detected"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field


# ---------------------------------------------------------------- appearance


def test_appearance_is_a_unit_descriptor_that_tells_colours_apart():
    frames, _ = scene([{"A": [40, 40, 100, 100], "B": [200, 40, 260, 100]}, {"A": [48, 44, 108, 104]}])
    a0, b0 = appearance(frames[0], np.array([40, 40, 100, 100])), appearance(frames[0], np.array([200, 40, 260, 100]))
    a1 = appearance(frames[1], np.array([48, 44, 108, 104]))
    assert np.linalg.norm(a0) == pytest.approx(1.0)
    assert a0 @ a1 > 0.95 and a0 @ b0 < 0.3
    flat = np.full((50, 50, 3), 90, np.uint8)
    assert not appearance(flat, np.array([10, 10, 30, 30])).any()


def test_appearance_keeps_the_face_when_two_faces_swap_places():
    left, right = [100, 80, 130, 140], [140, 80, 170, 140]   # centres 40 px apart, size 60: both within reach
    big_left = [99, 79, 131, 141]                             # A is the larger face: both trackers seed on it
    look_a, look_b = np.eye(48)[0], np.eye(48)[1]
    per_frame = [boxes(big_left, right)] * 3 + [boxes(left, right)] * 3
    probs = [np.array([0.999, 0.999])] * 6
    looks = [[look_a, look_b]] * 3 + [[look_b, look_a]] * 3   # from frame 3: B on the left, A on the right
    by_position, _ = track_boxes(per_frame, probs)
    assert np.allclose(by_position[3:], [left] * 3)     # position follows the place: now B
    by_look, detected = track_boxes(per_frame, probs, looks, 0.7)
    assert np.allclose(by_look[:3], [big_left] * 3) and np.allclose(by_look[3:], [right] * 3)   # A throughout
    assert detected.all()
    # a look only a little less alike than the gate still loses to a better one at a worse place
    looks[3] = [0.8 * look_a + 0.6 * look_b, 0.9 * look_a + np.sqrt(0.19) * look_b]
    by_look, _ = track_boxes(per_frame, probs, looks, 0.7)
    assert np.allclose(by_look[3], left)   # both pass the gate: the place decides (overlap - distance + look)


def test_at_a_cut_the_track_stays_with_the_face_seen_longest():
    a = [100, 80, 160, 140]
    b = [150, 70, 230, 150]   # the next shot's face: larger, and close enough to pass by position
    faces_at = [{"A": a}] * 7 + [{"B": b}] * 3
    frames, table = scene(faces_at)
    by_position = fake_detector(table, detect_every=1, track_by="position").track(frames)
    assert by_position.detected.all()    # the jump this fixes: seeded on B, the track runs through A
    by_look = fake_detector(table, detect_every=1, track_by="appearance").track(frames)
    assert by_look.detected.tolist() == [True] * 7 + [False] * 3
    assert np.allclose(raw_boxes(by_look), [a] * 10)   # after the cut: A's last box, borrowed


# ---------------------------------------------------------------- MTCNN


def test_detector_finds_a_drawn_face(detector):
    rng = np.random.default_rng(3)
    frames = render_frames("happy", rng, 8, (320, 240), np.zeros(8), peak=4)
    track = detector.track(frames)
    assert track.found
    assert track.detected.sum() >= 7
    assert track.crops.shape == (8, 224, 224, 3) and track.crops.dtype == np.uint8
    assert track.boxes.shape == (8, 4)
    side = track.boxes[:, 2] - track.boxes[:, 0]
    assert np.allclose(side, track.boxes[:, 3] - track.boxes[:, 1])  # square
    assert (40 < side).all() and (side < 240).all()  # a face-sized box, not the whole frame
    centre = (track.boxes[:, :2] + track.boxes[:, 2:]) / 2
    assert (np.abs(centre[:, 0] - 160) < 60).all() and (np.abs(centre[:, 1] - 120) < 60).all()


def test_detect_every_1_by_position_gives_the_crops_of_before_with_mtcnn():
    rng = np.random.default_rng(5)
    frames = render_frames("sad", rng, 6, (320, 240), np.zeros(6), peak=3)
    det = FaceDetector(TODAY)
    track = det.track(frames)
    per_frame, probs = det.detect(frames)   # the steps of the tracking before this change, one by one
    raw, detected = track_boxes(per_frame, probs)
    squares = np.stack([square_box(b, 0.2) for b in raw])
    assert np.array_equal(track.detected, detected) and np.array_equal(track.boxes, squares)
    assert np.array_equal(track.crops, np.stack([crop(f, b, 224) for f, b in zip(frames, squares)]))
    assert det.work.frames == 12 and det.work.calls == 2


def test_detector_scales_boxes_back_to_frame_pixels(detector):
    rng = np.random.default_rng(4)
    frames = render_frames("neutral", rng, 2, (320, 240), np.zeros(2), peak=1)
    big = np.repeat(np.repeat(frames, 4, axis=1), 4, axis=2)  # 1280 x 960: detected at 640 x 480
    small_boxes, _ = detector.detect(frames)
    big_boxes, _ = detector.detect(big)
    assert len(small_boxes[0]) >= 1 and len(big_boxes[0]) >= 1
    assert np.allclose(big_boxes[0][0], small_boxes[0][0] * 4, atol=24)


def test_frames_downscaled_where_they_were_decoded_give_the_same_tracks():
    """track_many(smalls=...): the preparation processes downscale for MTCNN; the tracks are the same."""
    rng = np.random.default_rng(6)
    clips = [np.repeat(np.repeat(render_frames(e, rng, 5, (320, 240), np.zeros(5), peak=2), 2, axis=1), 2, axis=2)
             for e in ("happy", "angry")]   # 640 x 480: downscaled to 320 for detection
    det = FaceDetector(FaceSettings(detect_side=320, detect_every=2))
    here = det.track_many(clips)
    small = [detection_frames(c, 320) for c in clips]
    assert small[0][0].shape == (5, 240, 320, 3) and small[0][1:] == (2.0, 2.0)
    given = det.track_many(clips, smalls=small)
    for a, b in zip(here, given):
        assert a.found and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.crops, b.crops)
    with pytest.raises(ValueError, match="do not match"):
        det.track_many(clips, smalls=[small[0], (small[1][0][:3], 2.0, 2.0)])


def test_no_face_gives_whole_frames(detector):
    frames = np.zeros((3, 120, 200, 3), np.uint8)
    frames[:, :, :100] = 200  # left half bright: the centre square shows both halves
    track = detector.track(frames)
    assert not track.found and not track.detected.any()
    assert track.crops.shape == (3, 224, 224, 3)
    assert np.allclose(track.boxes, [[40, 0, 160, 120]] * 3)
    assert track.crops[0, :, :100].mean() > 190 and track.crops[0, :, 124:].mean() < 10


def test_detector_rejects_bad_frames(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((2, 32, 32, 3), np.float32))


# ---------------------------------------------------------------- global frame


def constructed_track(n: int = 6, odd: int = 4) -> FaceTrack:
    crops = np.full((n, 32, 32, 3), 120, np.uint8)
    crops[:, 10:20, 10:20] = 90
    crops[odd, 20:30, 5:28] = 250  # an open mouth: the most different face
    crops[1, 12:14, 12:14] = 60  # a small change
    return FaceTrack(crops, np.zeros((n, 4)), np.ones(n, bool), True)


def test_peak_index_finds_the_most_different_face():
    track = constructed_track(odd=4)
    assert peak_index(track.crops) == 4
    assert peak_index(track.crops[:1]) == 0
    with pytest.raises(ValueError):
        peak_index(track.crops[:0])


def test_the_peak_frame_is_the_most_different_crop():
    track = constructed_track(n=6, odd=4)
    assert peak_frame_index(track) == 4
    with pytest.raises(ValueError, match="empty track"):
        peak_frame_index(FaceTrack(track.crops[:0], track.boxes[:0], track.detected[:0], True))


def test_peak_ignores_frames_without_a_detected_face():
    track = constructed_track(n=6, odd=4)
    track.detected[4] = False  # the odd crop came from a borrowed box: no face there
    assert peak_frame_index(track) == 1  # the next most different detected frame


# ---------------------------------------------------------------- real clips


@pytest.mark.samples
@pytest.mark.slow
@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples/mer2023-examples is absent")
def test_faces_found_on_every_real_clip(detector):
    clips = sorted(SAMPLES.glob("*.mp4"))
    assert len(clips) == 10
    rates, report = [], []
    for clip in clips:
        info = probe(clip)
        frames = read_frames(clip, uniform_indices(info.n_frames, 16), info=info)
        t0 = time.perf_counter()
        track = detector.track(frames)
        dt = time.perf_counter() - t0
        report.append(f"{clip.name}: {track.detected.sum()}/16 detected, {dt:.2f} s")
        assert track.found, clip.name
        # one clip (sample_00000727) is a dark, bowed head: MTCNN finds it in about half the frames
        assert track.detected.mean() >= 0.4, clip.name
        side = track.boxes[:, 2] - track.boxes[:, 0]
        assert (side < 1.5 * min(frames.shape[1:3])).all()  # a face box, not the whole frame
        rates.append(track.detected.mean())
    print("\n" + "\n".join(report))
    assert np.mean(rates) >= 0.85


def anchor_frames(path: Path) -> tuple[np.ndarray, list[int]]:
    """The frames a clip's face track runs over, and their frame indices, as extract.step.prepare picks them."""
    info = probe(path)
    fr = FrameSettings()
    wanted, local_pos, temporal_pos = frame_plan(info.n_frames, fr)
    frames = read_frames(path, wanted, max_side=fr.max_side, info=info)
    anchors = sorted(set(local_pos) | set(temporal_pos[::TEMPORAL_PER_SEGMENT]))
    return frames[anchors], [wanted[a] for a in anchors]


def centre_x(track: FaceTrack) -> np.ndarray:
    return (track.boxes[:, 0] + track.boxes[:, 2]) / 2


@pytest.mark.samples
@pytest.mark.slow
def test_the_track_does_not_jump_at_the_scene_cut_of_samplenew_00061200(samples_dir):
    frames, times = anchor_frames(samples_dir / "samplenew_00061200.mp4")
    after = np.array(times) >= 53   # the shot changes between frames 52 and 53: another man, further right
    assert 0 < after.sum() < len(times)
    before_fix = FaceDetector(TODAY).track(frames, times)
    assert before_fix.detected.all() and (centre_x(before_fix)[after] > 560).all()   # it jumped to him
    track = FaceDetector().track(frames, times)
    assert track.detected[~after].all() and not track.detected[after].any()
    assert (centre_x(track) < 500).all()   # the first man's place (x about 400 of 1280) throughout


def write_clip(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "18"})
        vs.height, vs.width = frames.shape[1:3]
        vs.pix_fmt = "yuv420p"
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)


@pytest.mark.samples
@pytest.mark.slow
def test_a_clip_cut_from_two_real_clips_keeps_the_track_on_one_person(samples_dir, tmp_path):
    # Two real 960 x 544 clips whose women sit at the same place in the frame (centre about (0.42, 0.49)
    # of the frame, a fifth of its width): A, then B, then A again. By position alone the track cannot
    # tell them apart.
    a, b = samples_dir / "sample_00001073.mp4", samples_dir / "sample_00004136.mp4"
    joined = np.concatenate([read_frames(a, range(0, 30)), read_frames(b, range(40, 70)),
                             read_frames(a, range(60, 90))])
    write_clip(tmp_path / "cut.mp4", joined)
    frames, times = anchor_frames(tmp_path / "cut.mp4")
    in_b = (np.array(times) >= 30) & (np.array(times) < 60)
    assert in_b.sum() >= 5 and (~in_b).sum() >= 10

    before_fix = FaceDetector(TODAY).track(frames, times)
    assert before_fix.detected[in_b].all()   # B's face continued the track

    track = FaceDetector().track(frames, times)
    assert not track.detected[in_b].any()              # B never joins A's track ...
    assert track.detected[~in_b].mean() >= 0.9         # ... which runs through both of A's parts
    a_boxes = track.boxes[~in_b]
    for i in np.flatnonzero(in_b):                     # B's frames keep a box of A's (borrowed)
        assert any(np.array_equal(track.boxes[i], box) for box in a_boxes)
    looks = np.stack([appearance(frames[i], track.boxes[i]) for i in np.flatnonzero(track.detected)])
    assert (looks @ looks[0] > 0.7).all()              # every frame the track found looks like A

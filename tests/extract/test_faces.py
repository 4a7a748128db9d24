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
    BORROWED,
    DETECTED,
    INTERPOLATED,
    CUT_BINS,
    UNSEEN,
    FaceDetector,
    FaceSettings,
    FaceTrack,
    appearance,
    centre_square,
    colour_histogram,
    detection_frames,
    crop,
    detect_positions,
    fill_boxes,
    is_weak,
    peak_frame_index,
    peak_index,
    refine_positions,
    shot_ids,
    square_box,
    track_boxes,
)
from emollama.extract.sample import render_frames
from emollama.extract.step import TEMPORAL_PER_SEGMENT, FrameSettings, frame_plan

# the face settings before detect_every, appearance and shots
TODAY = FaceSettings(detect_every=1, track_by="position", cut_distance=1.0)


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
                 "appearance_min": 0.7, "cut_distance": 0.2, "detect_on": "auto"}


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
    got, state = fill_boxes(times, [0, 2, 4], np.stack([b0, b2, b4]), np.array([True, True, True]))
    assert state.tolist() == [DETECTED, INTERPOLATED, DETECTED, INTERPOLATED, DETECTED]
    assert np.array_equal(got[[0, 2, 4]], [b0, b2, b4])
    assert np.allclose(got[1], b0 + (2 / 3) * (b2 - b0))    # t = 2 between t = 0 and t = 3
    assert np.allclose(got[3], b2 + (5 / 7) * (b4 - b2))    # t = 8 between t = 3 and t = 10


def test_a_frame_next_to_a_failed_detection_borrows_like_today():
    b0, b4 = np.array([10., 20, 50, 70]), np.array([60., 20, 100, 70])
    # the track was not found in sampled frame 2: track_boxes lent it frame 0's box (the earlier on a tie)
    got, state = fill_boxes(range(5), [0, 2, 4], np.stack([b0, b0, b4]), np.array([True, False, True]))
    assert state.tolist() == [DETECTED, BORROWED, BORROWED, BORROWED, DETECTED]
    assert np.array_equal(got, [b0, b0, b0, b4, b4])   # nearest found frame, the earlier on a tie


def test_every_frame_sampled_leaves_the_track_as_it_is():
    b = np.array([[10., 20, 50, 70], [12, 20, 52, 70], [12, 20, 52, 70], [16, 22, 56, 72]])
    got, state = fill_boxes(range(4), range(4), b.copy(), np.array([True, True, False, True]))
    assert np.array_equal(got, b) and state.tolist() == [DETECTED, DETECTED, BORROWED, DETECTED]


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


# ---------------------------------------------------------------- shots


def two_shots(n_first: int, n_second: int, size=(240, 320)) -> np.ndarray:
    """Frames of a warm room, then of a cool one, each with a little noise (a camera's grain)."""
    rng = np.random.default_rng(0)
    frames = np.empty((n_first + n_second, *size, 3), np.uint8)
    frames[:n_first] = (170, 120, 90)
    frames[n_first:] = (60, 90, 150)
    return np.clip(frames + rng.integers(-6, 7, frames.shape), 0, 255).astype(np.uint8)


def test_shots_are_cut_where_the_colours_change():
    frames = two_shots(3, 2)
    h = colour_histogram(frames[0])
    assert h.shape == (CUT_BINS ** 3,) and h.sum() == pytest.approx(1.0)
    assert shot_ids(frames, 0.2).tolist() == [0, 0, 0, 1, 1]
    assert shot_ids(frames, 1.0).tolist() == [0] * 5          # 1: no cuts
    assert shot_ids(frames[:1], 0.2).tolist() == [0] and shot_ids(frames[:0], 0.2).tolist() == []
    # a dark, grey frame whose grain changes every pixel's hue stays in its shot (RGB bins, not hue)
    dark = np.clip(np.full((4, 120, 160, 3), 20) + np.random.default_rng(1).integers(-4, 5, (4, 120, 160, 3)),
                   0, 255).astype(np.uint8)
    assert shot_ids(dark, 0.2).tolist() == [0] * 4


def test_a_chain_never_crosses_a_cut_and_the_main_face_is_the_one_detected_most():
    a = [[100, 100, 140, 150], [102, 100, 142, 150], [104, 100, 144, 150], [106, 100, 146, 150]]
    b = [90, 80, 170, 180]   # the next shot's face, in the same place and four times as large
    per_frame = [boxes(x) for x in a] + [boxes(b)] * 2
    probs = [np.array([0.999])] * 6
    shots = [0, 0, 0, 0, 1, 1]
    for looks in (None, [[np.eye(48)[0]]] * 6):   # by position, and by look (a look that B shares)
        got, detected = track_boxes(per_frame, probs, looks, 0.7, shots)
        assert detected.tolist() == [True] * 4 + [False] * 2     # A: 4 frames; B, larger in all, 2
        assert np.allclose(got[:4], a) and np.isnan(got[4:]).all()   # nothing borrowed into B's shot
        joined, detected = track_boxes(per_frame, probs, looks, 0.7)   # one shot: B continues A's chain
        assert detected.all()
    # in one shot, a face detected in more frames beats a larger one detected in fewer
    big = [300, 50, 420, 190]
    per_frame = [boxes(a[0], big), boxes(a[1], big), boxes(a[2])]
    got, _ = track_boxes(per_frame, [np.array([0.999, 0.999]), np.array([0.999, 0.999]), np.array([0.999])])
    assert np.allclose(got, a[:3])


def test_boxes_are_never_interpolated_or_borrowed_across_a_cut():
    b0, b2 = np.array([10., 20, 50, 70]), np.array([30., 20, 70, 70])
    # detected on 0 and 2, not on 4; frames 4-5 are another shot
    got, state = fill_boxes(range(6), [0, 2, 4], np.stack([b0, b2, b2]), np.array([True, True, False]),
                            [0, 0, 0, 0, 1, 1])
    assert state.tolist() == [DETECTED, INTERPOLATED, DETECTED, BORROWED, UNSEEN, UNSEEN]
    assert np.allclose(got[1], (b0 + b2) / 2) and np.array_equal(got[3], b2) and np.isnan(got[4:]).all()
    # two detected frames in different shots: no interpolation between them, each side borrows its own
    got, state = fill_boxes(range(4), [0, 3], np.stack([b0, b2]), np.array([True, True]), [0, 0, 1, 1])
    assert state.tolist() == [DETECTED, BORROWED, BORROWED, DETECTED]
    assert np.array_equal(got[1], b0) and np.array_equal(got[2], b2)


def test_refine_skips_the_shots_the_track_is_not_in():
    steady = np.array([100., 100, 160, 170])
    bx = np.stack([steady] * 4)
    # lost from frame 6 on: 6 is a new shot, so only the frames between 3 and 6 are detected again
    assert refine_positions([0, 3, 6, 9], bx, np.array([True, True, False, False]), [0, 0, 1, 1]) == [4, 5]
    assert refine_positions([0, 3, 6, 9], bx, np.array([True, True, False, False])) == [4, 5, 7, 8]
    assert refine_positions([0, 3], bx[:2], np.zeros(2, bool), [0, 1]) == [1, 2]   # no face yet: everywhere


def test_the_next_shots_frames_get_centre_squares_not_the_main_faces_box():
    a, b = [100, 80, 160, 140], [150, 70, 230, 150]
    faces_at = [{"A": a}] * 7 + [{"B": b}] * 3
    frames, table = scene(faces_at)
    frames[7:][(frames[7:] == 100).all(axis=-1)] = (40, 150, 60)   # the next shot: another room
    for k in range(10):
        frames[k, 0, 0, 0] = k
    track = fake_detector(table, detect_every=1).track(frames)
    assert track.shots.tolist() == [0] * 7 + [1] * 3
    assert track.state.tolist() == [DETECTED] * 7 + [UNSEEN] * 3
    assert np.allclose(raw_boxes(track)[:7], [a] * 7)
    assert np.allclose(track.boxes[7:], [centre_square(320, 240)] * 3)
    assert track.counts() == {"detected": 7, "interpolated": 0, "absent": 3}
    assert not is_weak(**track.counts()) and is_weak(3, 1, 5) and is_weak(0, 0, 0) and not is_weak(2, 2, 4)
    # the caller's shots win over the frames' own (the step cuts over more frames than it tracks)
    assert fake_detector(table, detect_every=1).track(frames, shots=[0] * 10).state.tolist() == [DETECTED] * 7 + [BORROWED] * 3


@pytest.mark.samples
@pytest.mark.slow
def test_the_cut_distance_finds_the_one_real_cut_and_none_inside_the_real_shots(samples_dir):
    """Calibration on every decoded frame of the ten real clips (the step cuts over all of them): one cut,
    in samplenew_00061200 between frames 52 and 53 (its planned frames 50 and 54); the default is well
    away from both sides (at most 0.10 inside a shot, 0.40 at the cut)."""
    fr = FrameSettings()
    inside, cut = [], []
    for clip in sorted(samples_dir.glob("*.mp4")):
        info = probe(clip)
        wanted, _, _ = frame_plan(info.n_frames, fr)
        hists = [colour_histogram(f) for f in read_frames(clip, wanted, max_side=fr.max_side, info=info)]
        d = [0.5 * float(np.abs(y - x).sum()) for x, y in zip(hists, hists[1:])]
        for (i, j), x in zip(zip(wanted, wanted[1:]), d):
            (cut if clip.stem == "samplenew_00061200" and i < 53 <= j else inside).append(x)
    assert len(cut) == 1 and len(inside) > 250
    assert max(inside) < FaceSettings().cut_distance / 1.8 and cut[0] > 1.8 * FaceSettings().cut_distance


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
    return FaceTrack(crops, np.zeros((n, 4)), np.full(n, DETECTED), np.zeros(n, int), True)


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
        peak_frame_index(FaceTrack(track.crops[:0], track.boxes[:0], track.state[:0], track.shots[:0], True))


def test_peak_ignores_frames_without_a_detected_face():
    track = constructed_track(n=6, odd=4)
    track.state[4] = BORROWED  # the odd crop came from a borrowed box: no face there
    assert peak_frame_index(track) == 1  # the next most different detected frame


# ---------------------------------------------------------------- real clips


@pytest.mark.samples
@pytest.mark.slow
def test_faces_found_on_every_real_clip(detector, samples_dir):
    clips = sorted(samples_dir.glob("*.mp4"))
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
    by_look = FaceDetector(FaceSettings(cut_distance=1.0)).track(frames, times)   # no cuts: the look alone
    assert by_look.detected[~after].all() and not by_look.detected[after].any()
    assert (centre_x(by_look) < 500).all()   # the first man's place (x about 400 of 1280), borrowed after the cut
    track = FaceDetector().track(frames, times)
    assert track.shots.tolist() == after.astype(int).tolist()   # the cut is found, between frames 52 and 53
    assert track.detected[~after].all() and (centre_x(track)[~after] < 500).all()
    assert (track.state[after] == UNSEEN).all()   # nothing borrowed across the cut: the centre squares there
    assert np.allclose(track.boxes[after], centre_square(frames.shape[2], frames.shape[1]))


@pytest.mark.samples
@pytest.mark.slow
def test_a_clip_cut_from_two_real_clips_keeps_the_track_on_one_person(samples_dir, tmp_path, write_clip):
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

    # The cuts: three shots, and the track lives in one of them (no box crosses a cut)
    track = FaceDetector().track(frames, times)
    assert track.shots.tolist() == [0 if t < 30 else 1 if t < 60 else 2 for t in times]
    assert len(set(track.shots[track.detected])) == 1
    assert (track.state[track.shots != track.shots[track.detected][0]] == UNSEEN).all()

    # Without cuts (a cut the histograms miss), the look alone keeps B out of A's track
    track = FaceDetector(FaceSettings(cut_distance=1.0)).track(frames, times)
    assert not track.detected[in_b].any()              # B never joins A's track ...
    assert track.detected[~in_b].mean() >= 0.9         # ... which runs through both of A's parts
    a_boxes = track.boxes[~in_b]
    for i in np.flatnonzero(in_b):                     # B's frames keep a box of A's (borrowed)
        assert any(np.array_equal(track.boxes[i], box) for box in a_boxes)
    looks = np.stack([appearance(frames[i], track.boxes[i]) for i in np.flatnonzero(track.detected)])
    assert (looks @ looks[0] > 0.7).all()              # every frame the track found looks like A

"""The face views of a clip come from the span where its main face is (extract.step: `span_plan`,
`use_track`, `track_faces`): constructed looks first (exact, fast), then real clips: one joined from two
real sample clips at a cut, a single-shot one and one without a face, each prepared both ways
(detect_on = "prep" and "encoder")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from emollama.extract import decode, faces, step
from emollama.extract.faces import BORROWED, DETECTED, INTERPOLATED, UNSEEN, FaceDetector, FaceTrack, centre_square
from emollama.extract.registry import FACE_CLIP, FACE_FRAMES, FRAME, WAVEFORM
from emollama.extract.step import ClipJob, ExtractSettings, FrameSettings, Look, plan_frames, span_plan, use_track

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CROP = 8
BOX = np.array([4.0, 4.0, 20.0, 20.0])


def constructed_look(n_frames: int, present: range, cut_at: int | None = None,
                     fr: FrameSettings = FrameSettings(), span: tuple[int, int] | None = None) -> Look:
    """A look whose every frame is filled with its frame index, tracked: the main face DETECTED at the
    anchors whose frame is in `present`, BORROWED at the others of its shot, UNSEEN in the shot after
    `cut_at` (a frame index); each anchor's crop is filled with its frame index too."""
    plan = plan_frames(n_frames, fr, span)
    frames = np.stack([np.full((32, 48, 3), f % 256, np.uint8) for f in plan.wanted])
    shots = np.array([int(cut_at is not None and f >= cut_at) for f in plan.wanted])
    anchors = [plan.wanted[a] for a in plan.anchors]
    state = np.array([DETECTED if f in present else UNSEEN if cut_at is not None and f >= cut_at else BORROWED
                      for f in anchors])
    crops = np.stack([np.full((CROP, CROP, 3), f % 256, np.uint8) for f in anchors])
    boxes = np.stack([centre_square(48, 32) if s == UNSEEN else BOX for s in state])
    found = bool((state == DETECTED).any())
    if not found:
        state[:] = UNSEEN
    return Look(plan, frames, shots, FaceTrack(crops, boxes, state, shots[plan.anchors], found))


def test_the_views_are_planned_again_inside_the_span_of_the_main_face():
    first = constructed_look(100, range(0, 69), cut_at=69)
    anchors = [first.plan.wanted[a] for a in first.plan.anchors]
    assert anchors[:3] == [3, 6, 9] and anchors[-3:] == [90, 93, 96]
    again = span_plan(first, FrameSettings())
    assert again.span == (3, 68)             # from the first to the last anchor where the main face is
    assert min(again.wanted) >= 3 and max(again.wanted) <= 68 and len(again.local) == 16 and len(again.temporal) == 16
    assert again.wanted == plan_frames(100, FrameSettings(), (3, 68)).wanted
    # present at the first and the last anchor: the views stay where they are; no face: nothing to plan
    assert span_plan(constructed_look(100, range(0, 100)), FrameSettings()) is None
    assert span_plan(constructed_look(100, range(0)), FrameSettings()) is None
    with pytest.raises(ValueError, match="not inside"):
        plan_frames(100, FrameSettings(), (50, 100))


def test_without_a_second_look_no_crop_comes_from_the_shot_without_the_main_face():
    """The cut falls between frames 68 and 69, inside the temporal pair (68, 69): the pair's second frame
    takes its anchor's crop, and the anchors after the cut take the crop of the last anchor before it."""
    first = constructed_look(100, range(0, 69), cut_at=69)
    prep = step.Prepared(ClipJob("c", "c.mp4"), {})
    use_track(prep, first, None, CROP)
    clip = prep.sources[FACE_CLIP]
    assert first.plan.wanted[first.plan.temporal[10]] == 68 and first.plan.wanted[first.plan.temporal[11]] == 69
    assert clip.frames == [6, 7, 18, 19, 31, 32, 43, 44, 56, 57, 68, 68, 68, 68, 68, 68]
    assert prep.sources[FACE_FRAMES].frames == [3, 9, 15, 21, 28, 34, 40, 46, 53, 59, 65, 68, 68, 68, 68, 68]
    for kind in (FACE_FRAMES, FACE_CLIP):   # every crop is the frame it says it was cut from
        assert [int(c.max()) for c in prep.inputs[kind]] == [f % 256 for f in prep.sources[kind].frames]
        assert UNSEEN not in prep.sources[kind].states
    assert prep.record == {"face_found": True, "face_frames": 17, "sampled_frames": 24, "face_detected": 17,
                           "face_interpolated": 0, "face_absent": 7, "shots": 2, "face_span": [0, 99],
                           "global_index": prep.record["global_index"]}
    assert prep.record["global_index"] < 69   # the peak frame is one of the main face's


def test_the_second_look_gives_the_views_and_the_first_the_record():
    first = constructed_look(100, range(0, 69), cut_at=69)
    views = constructed_look(100, range(0, 100), span=(3, 68))
    prep = step.Prepared(ClipJob("c", "c.mp4"), {})
    use_track(prep, first, views, CROP)
    assert prep.sources[FACE_FRAMES].frames == [views.plan.wanted[p] for p in views.plan.local]
    assert all(3 <= f <= 68 for kind in (FACE_FRAMES, FACE_CLIP) for f in prep.sources[kind].frames)
    assert set(prep.sources[FACE_CLIP].states) == {DETECTED}
    assert (prep.record["face_span"], prep.record["shots"], prep.record["face_absent"]) == ([3, 68], 2, 7)
    # a second look that finds no face: the first one's views (with the substitutions above)
    blind = constructed_look(100, range(0), span=(3, 68))
    use_track(prep, first, blind, CROP)
    assert prep.record["face_span"] == [0, 99] and prep.sources[FACE_FRAMES].frames[-1] == 68


def test_a_clip_without_a_face_keeps_the_centre_squares_of_its_frames():
    first = constructed_look(100, range(0))
    prep = step.Prepared(ClipJob("c", "c.mp4"), {})
    use_track(prep, first, None, CROP)
    assert prep.sources[FACE_CLIP].frames == [first.plan.wanted[p] for p in first.plan.temporal]   # pairs intact
    assert set(prep.sources[FACE_CLIP].states) == {UNSEEN}
    assert (prep.record["face_found"], prep.record["face_absent"], prep.record["shots"]) == (False, 24, 1)


# ---------------------------------------------------------------- real clips

SIZE = (672, 378)   # both parts of the joined clip are re-encoded to this size, at 25 frames a second


def frames_of(path, indices=None, size=SIZE) -> np.ndarray:
    info = decode.probe(path)
    got = decode.read_frames(path, range(info.n_frames) if indices is None else indices, max_side=None, info=info)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in got])


@pytest.fixture(scope="module")
def settings() -> ExtractSettings:
    return ExtractSettings(encoders=None, missing_audio="silence")


@pytest.fixture(scope="module")
def detector(settings) -> FaceDetector:
    return FaceDetector(settings.faces)


def prepared_both_ways(path, settings, detector) -> step.Prepared:
    """The clip prepared clip by clip (detect_on = prep) and with its faces tracked on the encoding side
    (detect_on = encoder, `track_faces`): the same record, inputs and crop sources; the first is returned."""
    job = ClipJob(path.stem, str(path))
    here = step.prepare(job, settings, detector)
    there = step.prepare(job, settings, None)
    assert there.waiting is not None and FACE_FRAMES not in there.inputs
    step.track_faces([there], detector, settings)
    assert here.error is None and there.error is None, (here.error, there.error)
    assert here.record == there.record and there.waiting is None
    for kind in (WAVEFORM, FACE_FRAMES, FACE_CLIP, FRAME):
        np.testing.assert_array_equal(here.inputs[kind], there.inputs[kind], err_msg=kind)
    for kind in (FACE_FRAMES, FACE_CLIP):
        assert dataclasses.asdict(here.sources[kind]).keys() == dataclasses.asdict(there.sources[kind]).keys()
        assert here.sources[kind].frames == there.sources[kind].frames
        np.testing.assert_array_equal(here.sources[kind].boxes, there.sources[kind].boxes)
    return here


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.samples
@pytest.mark.slow
def test_a_two_shot_clip_takes_every_face_crop_from_the_long_shot_of_its_speaker(
        samples_dir, tmp_path, write_clip, settings, detector):
    """A long shot of one woman (sample_00000338, 114 frames, her face a fifth of the frame's height),
    then a short shot of another (the first 28 frames of sample_00001073, her face half of it) near the
    same place. Before this change (the main face: the largest summed box area; boxes borrowed across the
    cut), the listener won the track (found in 5 of 24 frames) and 19 of 24 crops showed the speaker's
    jacket, cut with the listener's box."""
    speaker = frames_of(samples_dir / "sample_00000338.mp4")
    listener = frames_of(samples_dir / "sample_00001073.mp4", range(28))
    write_clip(tmp_path / "speaker.mp4", speaker)
    write_clip(tmp_path / "two-shots.mp4", np.concatenate([speaker, listener]))
    n = len(speaker)

    prep = prepared_both_ways(tmp_path / "two-shots.mp4", settings, detector)
    rec = prep.record
    assert rec["face_found"] and rec["shots"] == 2
    assert rec["face_detected"] + rec["face_interpolated"] + rec["face_absent"] == rec["sampled_frames"] == 24
    assert rec["face_frames"] == rec["face_detected"] + rec["face_interpolated"]
    first = plan_frames(n + 28, settings.frames)
    in_listener = sum(first.wanted[a] >= n for a in first.anchors)
    assert in_listener >= 3 and rec["face_absent"] >= in_listener   # her shot's anchors: absent, not borrowed
    assert 0 <= rec["face_span"][0] < rec["face_span"][1] < n       # the views were planned again, in her shot
    assert rec["global_index"] < n

    # every crop: from the speaker's shot, where the speaker's own track (her clip alone) finds her
    for kind in (FACE_FRAMES, FACE_CLIP):
        src = prep.sources[kind]
        assert len(src.frames) == 16 and all(0 <= f < n for f in src.frames), (kind, src.frames)
        assert set(src.states) <= {DETECTED, INTERPOLATED, BORROWED}
        at = sorted(set(src.frames))
        alone = detector.track(decode.read_frames(tmp_path / "speaker.mp4", at), at)
        assert alone.detected.all()
        for f, box in zip(src.frames, src.boxes):
            assert iou(box, alone.boxes[at.index(f)]) > 0.6, (kind, f)

    # the contact sheet shows exactly the crops the encoders were given, under a line of their own
    sheet = np.asarray(Image.open(step.write_preview(tmp_path / "preview", prep)))
    assert sheet.shape[:2] == (16 + 2 * (16 + 2 * 112) + 16 + round(378 * 8 * 112 / 672), 8 * 112)
    for kind, top in ((FACE_FRAMES, 32), (FACE_CLIP, 32 + 2 * 112 + 16)):
        for i in (0, 9, 15):
            x, y = (i % 8) * 112, top + (i // 8) * 112
            want = np.asarray(Image.fromarray(prep.inputs[kind][i]).resize((112, 112)))
            np.testing.assert_array_equal(sheet[y + 14:y + 112, x:x + 112], want[14:], err_msg=f"{kind} {i}")


@pytest.mark.samples
@pytest.mark.slow
def test_a_single_shot_real_clip_keeps_its_planned_frames_with_the_face_in_every_one(samples_dir, settings, detector):
    path = samples_dir / "sample_00001073.mp4"
    prep = prepared_both_ways(path, settings, detector)
    rec = prep.record
    assert (rec["shots"], rec["face_absent"], rec["face_span"]) == (1, 0, [0, 91])
    assert rec["face_detected"] + rec["face_interpolated"] == rec["sampled_frames"] == rec["face_frames"] == 24
    assert rec["face_detected"] >= 8 and not faces.is_weak(rec["face_detected"], rec["face_interpolated"], 0)
    plan = plan_frames(92, settings.frames)
    assert prep.sources[FACE_FRAMES].frames == [plan.wanted[p] for p in plan.local]   # no frame replaced
    assert prep.sources[FACE_CLIP].frames == [plan.wanted[p] for p in plan.temporal]


@pytest.mark.slow
def test_a_clip_without_a_face_uses_whole_frames_and_says_so(tmp_path, write_clip, settings, detector):
    """A clip of drifting colour gradients: no face in any frame, one shot."""
    y, x = np.mgrid[0:180, 0:320]
    frames = np.stack([np.stack([(x + 4 * k) % 256, (y + 2 * k) % 256, np.full_like(x, 90)], -1)
                       for k in range(50)]).astype(np.uint8)
    write_clip(tmp_path / "no-face.mp4", frames)
    prep = prepared_both_ways(tmp_path / "no-face.mp4", settings, detector)
    rec = prep.record
    assert not rec["face_found"] and (rec["face_detected"], rec["face_interpolated"], rec["face_absent"]) == (0, 0, 24)
    assert rec["shots"] == 1 and rec["face_span"] == [0, 49]
    assert faces.is_weak(0, 0, 24)
    for kind in (FACE_FRAMES, FACE_CLIP):
        assert set(prep.sources[kind].states) == {UNSEEN}
        assert np.allclose(prep.sources[kind].boxes, centre_square(320, 180))
    assert step.face_summary(rec).startswith("NO FACE")

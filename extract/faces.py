"""Face detection, tracking and cropping with facenet-pytorch's MTCNN.

MTCNN runs on every ``detect_every``-th frame of a clip (the first and last always), downscaled to
``detect_side``, all in one batched call on the detector's device; a second call takes the frames next
to one where the track was lost or moved too far to interpolate (`refine_positions`).
`FaceDetector.track_many` batches the frames of several clips, grouped by detection size: the
extraction step uses it on the encoding device for a group of clips when ``detect_on`` says so (the
default on a GPU), and tracks clip by clip in its preparation processes otherwise.

Shots first: consecutive frames whose colour histograms differ by more than ``cut_distance``
(`shot_ids`: 8 x 8 x 8 RGB bins, total variation distance) are in different shots. A face is never
matched, interpolated or borrowed across a cut: a track lives inside one shot. Then the main face is
followed frame to frame:

- every confident face seeds a chain, followed by overlap and centre distance (and with ``track_by =
  "appearance"`` by look too: a face continues the chain only when its `appearance`, a 4 x 4 colour
  thumbnail of the face and its surroundings, is at least ``appearance_min`` similar to the chain's
  last face, and the better look counts in the choice);
- the main face is the chain detected in the most frames, the larger (summed box area) on a tie. So a
  listener whose larger face fills a short last shot does not take the track from the speaker of the
  long first one.

Each frame of a track has a state (`FaceTrack.state`): ``DETECTED`` (MTCNN found the main face
there), ``INTERPOLATED`` (between two detected frames of the same shot: the box is interpolated
linearly in time), ``BORROWED`` (neither, but the main face is in this frame's shot: the box of the
nearest frame of the shot where it was found) or ``UNSEEN`` (the main face is in no frame of this
shot: the crop is the centre square of the whole frame, as for a clip without a face). The box is
widened by ``margin`` on each side, made square and cropped (parts outside the frame are black), then
resized to ``crop_size``. The extraction step samples the face views again inside the span where the
main face is present, so that no crop of another shot reaches an encoder (`extract.step`).

When no face is found in any frame, the crops are centre squares of the whole frames
(side = the frame's shorter side) resized to ``crop_size``, and ``FaceTrack.found`` is
False so the caller can record it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from emollama.extract.registry import FACE_INPUTS
from emollama.extract.settings import value

log = logging.getLogger(__name__)

CONFIDENT = 0.99  # MTCNN probability for a face to seed the track (backs of heads score ~0.8-0.96)
MAX_CENTRE_JUMP = 1.0  # accept a match whose centre moved at most this many box sizes
APPEARANCE_SIDE = 4  # the appearance descriptor: a 4 x 4 colour thumbnail ...
APPEARANCE_CONTEXT = 0.5  # ... of the face box widened by this much of its size on each side (hair, clothes, room)
APPEARANCE_CHROMA = 4.0  # ... the weight of its colour (R - G, B - G) beside its brightness
REFINE_CHANGE = 0.2  # detect_every > 1: detect the frames between two whose boxes differ more than this (of the size)
DETECT_CHUNK = 256  # at most this many frames per MTCNN call (bounds GPU memory when clips are batched)
CUT_BINS = 8   # shot cuts: a colour histogram of CUT_BINS^3 RGB bins per frame ...
CUT_SIDE = 256  # ... of the frame subsampled to about this longest side
# a track is weak when the main face is absent (borrowed or unseen) in more than this share of the
# anchor frames: the face views then show the face for less than half of the clip
WEAK_ABSENT = 0.5
# How a track's box was found in a frame (FaceTrack.state): module docstring
UNSEEN, BORROWED, INTERPOLATED, DETECTED = 0, 1, 2, 3
TRACK_BY = ("position", "appearance")
DETECT_ON = ("auto", "prep", "encoder")


@dataclass(frozen=True)
class FaceSettings:
    """[extract.faces]: every field changes the values of the sets read from face crops (and of the
    whole frame when it is the peak-face frame)."""

    detector: str = value("mtcnn", inputs=FACE_INPUTS, choices=("mtcnn",))   # the face detector (facenet-pytorch MTCNN)
    crop_size: int = value(224, inputs=FACE_INPUTS, min=1)   # side of the square face crop, pixels
    margin: float = value(0.2, inputs=FACE_INPUTS, min=0.0, max=1.0)  # of the box size, added on each side, then squared
    min_face_size: int = value(20, inputs=FACE_INPUTS, min=1)  # pixels of the detection image (longest side detect_side)
    thresholds: tuple[float, float, float] = value((0.6, 0.7, 0.7), inputs=FACE_INPUTS)   # MTCNN stage thresholds (P, R, O nets)
    detect_side: int = value(640, inputs=FACE_INPUTS, min=1)  # frames are downscaled to this longest side for detection
    # MTCNN sees every k-th anchor frame (the last too, and those next to a lost or moving face); boxes between are
    # interpolated in time. 1: every frame (2.1x the MTCNN work of 3 on the real samples; cheap on a GPU)
    detect_every: int = value(3, inputs=FACE_INPUTS, min=1)
    # position: match faces by position only | appearance: by look too (two people close together, or a cut
    # that cut_distance misses, do not hand the track to another person)
    track_by: str = value("appearance", inputs=FACE_INPUTS, choices=TRACK_BY)
    # track_by = appearance: the least similarity (cosine) of a face's look to the track's last face for it to
    # continue the track
    appearance_min: float = value(0.7, inputs=FACE_INPUTS, min=-1.0, max=1.0)
    # consecutive decoded frames whose colour histograms differ by more than this (total variation, 0-1) are
    # in different shots: no face is matched, interpolated or borrowed across; 1: no cuts. On the ten real
    # samples: at most 0.10 inside a shot, 0.40 at the cut of samplenew_00061200, 0.30 or more between clips
    cut_distance: float = value(0.2, inputs=FACE_INPUTS, min=0.0, max=1.0)
    # where MTCNN runs. prep: each clip alone, on the CPU of a preparation process (values do not depend on
    # batching) | encoder: the frames of several clips together (extract.step.FACE_GROUP), on the encoders'
    # device (a GPU's speed; values can differ slightly with the batch) | auto: encoder when the encoders run
    # on a GPU, else prep
    detect_on: str = value("auto", inputs=FACE_INPUTS, choices=DETECT_ON)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d


@dataclass
class FaceTrack:
    crops: np.ndarray  # [N, crop, crop, 3] uint8
    boxes: np.ndarray  # [N, 4] float x1, y1, x2, y2 in frame pixels: the square actually cropped
    state: np.ndarray  # [N] int: DETECTED, INTERPOLATED, BORROWED or UNSEEN (module docstring)
    shots: np.ndarray  # [N] int: the shot of each frame (0, 1, ...: `shot_ids`)
    found: bool  # any face at all; False => crops are centre squares of the whole frames (all UNSEEN)

    @property
    def detected(self) -> np.ndarray:
        """[N] bool: the main face is present: detected in this frame, or between two frames where it was."""
        return self.state >= INTERPOLATED

    def counts(self) -> dict[str, int]:
        """The frames where the main face was detected, interpolated and absent (borrowed or unseen)."""
        return {"detected": int((self.state == DETECTED).sum()), "interpolated": int((self.state == INTERPOLATED).sum()),
                "absent": int((self.state <= BORROWED).sum())}


def is_weak(detected: int, interpolated: int, absent: int) -> bool:
    """A weak track: the main face absent in more than WEAK_ABSENT of the anchor frames (a clip without a
    face counts as weak too). Frames between two detections are present: with ``detect_every = 3``
    two in three are interpolated by design."""
    total = detected + interpolated + absent
    return total == 0 or absent > WEAK_ABSENT * total


def colour_histogram(frame: np.ndarray) -> np.ndarray:
    """A frame's colours: the share of its pixels in each of CUT_BINS^3 RGB bins, from the frame
    subsampled to about CUT_SIDE (every k-th pixel). RGB, not hue: the hue of grey and dark pixels
    flickers from frame to frame (on the real samples, 0.53 between two neighbouring frames of one shot
    against 0.03 here)."""
    k = max(1, max(frame.shape[:2]) // CUT_SIDE)
    q = frame[::k, ::k].reshape(-1, 3).astype(np.int64) * CUT_BINS // 256
    h = np.bincount((q[:, 0] * CUT_BINS + q[:, 1]) * CUT_BINS + q[:, 2], minlength=CUT_BINS ** 3)
    return h / max(1, h.sum())


def shot_ids(frames: Sequence[np.ndarray] | np.ndarray, cut_distance: float) -> np.ndarray:
    """The shot of each frame (in time order): 0 for the first, one more after every cut, where two
    consecutive frames' colour histograms differ by more than ``cut_distance`` (total variation: half
    the summed absolute difference, 0 to 1)."""
    hists = [colour_histogram(f) for f in frames]
    cuts = [0.5 * float(np.abs(b - a).sum()) > cut_distance for a, b in zip(hists, hists[1:])]
    return np.concatenate([[0], np.cumsum(cuts)]).astype(np.int64) if hists else np.zeros(0, np.int64)


@dataclass
class DetectWork:
    """What MTCNN has been given so far: a measure of the detection cost that does not depend on the load."""

    calls: int = 0
    frames: int = 0
    pixels: int = 0  # of the detection images (after downscaling to detect_side)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def appearance(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A cheap descriptor of how a face and its surroundings look, for telling people (and shots) apart.

    The box, widened by ``APPEARANCE_CONTEXT`` of its size on each side and squared (hair, clothes,
    background), is area-averaged to a 4 x 4 colour thumbnail. The descriptor is its brightness minus
    the mean brightness beside its colour (R - G and B - G, weighted ``APPEARANCE_CHROMA``), scaled to
    unit length: the dot product of two is their cosine similarity. Colour tells shots and people
    apart best on real clips (a face's colour stays when the head turns; brightness structure does
    not); in a grey clip the brightness alone remains. A flat grey patch gives zeros (similar to nothing).
    """
    x1, y1, x2, y2 = (int(round(v)) for v in square_box(box, APPEARANCE_CONTEXT))
    img = Image.fromarray(frame).crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
    x = np.asarray(img.resize((APPEARANCE_SIDE, APPEARANCE_SIDE), Image.BOX), np.float64)
    bright = x.mean(axis=-1)
    v = np.concatenate([(bright - bright.mean()).ravel(), APPEARANCE_CHROMA * (x[..., 0] - x[..., 1]).ravel(),
                        APPEARANCE_CHROMA * (x[..., 2] - x[..., 1]).ravel()])
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 1e-6 else np.zeros_like(v)


def _match(ref: np.ndarray, cands: np.ndarray, ref_look: np.ndarray | None = None,
           looks: Sequence[np.ndarray] | None = None, look_min: float = -1.0) -> int | None:
    """The candidate box that continues ``ref`` best, or None when none is close enough.

    Without looks: by position (overlap minus centre distance). With looks (``ref_look`` and one per
    candidate): a candidate must also be at least ``look_min`` similar to ``ref_look`` (cosine), and
    its similarity adds to its score."""
    if len(cands) == 0:
        return None
    size = max(ref[2] - ref[0], ref[3] - ref[1])
    rc = (ref[:2] + ref[2:]) / 2
    best, best_score = None, -np.inf
    for i, c in enumerate(cands):
        dist = float(np.linalg.norm((c[:2] + c[2:]) / 2 - rc)) / max(size, 1e-6)
        if dist > MAX_CENTRE_JUMP:
            continue
        score = _iou(ref, c) - dist
        if looks is not None:
            sim = float(ref_look @ looks[i])
            if sim < look_min:
                continue
            score += sim
        if score > best_score:
            best, best_score = i, score
    return best


def _area(b: np.ndarray) -> float:
    return float((b[2] - b[0]) * (b[3] - b[1]))


def _chain(per_frame: list[np.ndarray], si: int, sj: int, looks: list[list[np.ndarray]] | None,
           look_min: float, shots: np.ndarray) -> list[int | None]:
    """From the seed face (frame si, face sj), the face index it continues to in every frame of its shot
    (None: not found, or another shot)."""
    chain: list[int | None] = [None] * len(per_frame)
    chain[si] = sj
    for order in (range(si + 1, len(per_frame)), range(si - 1, -1, -1)):
        ref, ref_look = per_frame[si][sj], looks[si][sj] if looks is not None else None
        for i in order:
            if shots[i] != shots[si]:
                break   # a cut: the chain ends here
            j = _match(ref, per_frame[i], ref_look, looks[i] if looks is not None else None, look_min)
            if j is not None:
                chain[i] = j
                ref = per_frame[i][j]
                ref_look = looks[i][j] if looks is not None else None
    return chain


def track_boxes(per_frame: list[np.ndarray], probs: list[np.ndarray],
                looks: list[list[np.ndarray]] | None = None, look_min: float = -1.0,
                shots: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Follow the main face through per-frame detections.

    ``per_frame[i]`` is a [k, 4] array of boxes in frame i, ``probs[i]`` their [k]
    probabilities, ``shots[i]`` its shot (default: one shot). Returns ([N, 4] boxes, [N] detected);
    boxes of undetected frames are borrowed from the nearest detected frame of the same shot (the
    earlier one on a tie), and are NaN in a shot where the main face is not. Raises ValueError when no
    frame has a face.

    Every confident face seeds a chain (largest first, skipping faces an earlier chain holds), which
    follows it by position within its shot, and with ``looks`` (``looks[i][j]``: the `appearance` of
    face j of frame i) only to faces that also look like the chain's last face (similarity >=
    ``look_min``). The main face is the chain found in the most frames, the larger summed box area on a
    tie (the earlier chain on a full tie).
    """
    n = len(per_frame)
    shots = np.zeros(n, np.int64) if shots is None else np.asarray(shots)
    cands = [(i, j) for i in range(n) for j in range(len(per_frame[i]))]
    if not cands:
        raise ValueError("no face in any frame")
    if looks is not None and [len(x) for x in looks] != [len(b) for b in per_frame]:
        raise ValueError("track_boxes: looks must hold one descriptor per box")
    if len(shots) != n:
        raise ValueError("track_boxes: shots must give one shot per frame")
    confident = [(i, j) for i, j in cands if probs[i][j] >= CONFIDENT] or cands
    chain, best, held = None, (-1, -np.inf), set()
    for si, sj in sorted(confident, key=lambda ij: -_area(per_frame[ij[0]][ij[1]])):   # stable: ties keep order
        if (si, sj) in held:
            continue
        c = _chain(per_frame, si, sj, looks, look_min, shots)
        held.update((i, j) for i, j in enumerate(c) if j is not None)
        support = (sum(j is not None for j in c), sum(_area(per_frame[i][j]) for i, j in enumerate(c) if j is not None))
        if support > best:
            chain, best = c, support
    boxes = np.zeros((n, 4), np.float64)
    detected = np.zeros(n, bool)
    for i, j in enumerate(chain):
        if j is not None:
            boxes[i], detected[i] = per_frame[i][j], True
    return _borrow(boxes, detected, shots), detected


def _borrow(boxes: np.ndarray, detected: np.ndarray, shots: np.ndarray) -> np.ndarray:
    """Boxes of undetected frames: the nearest detected frame's of the same shot (the earlier one on a
    tie); NaN where no frame of the shot was detected."""
    for i in np.flatnonzero(~detected):
        hit = np.flatnonzero(detected & (shots == shots[i]))
        boxes[i] = boxes[hit[np.argmin(np.abs(hit - i))]] if len(hit) else np.nan
    return boxes


def detect_positions(n: int, every: int) -> list[int]:
    """The frames (of ``n``) MTCNN runs on: every ``every``-th, the first and the last always."""
    if n <= 0:
        return []
    if every < 1:
        raise ValueError(f"detect_every must be at least 1, got {every}")
    return sorted(set(range(0, n, every)) | {n - 1})


def _change(a: np.ndarray, b: np.ndarray) -> float:
    """How much box b differs from box a: the larger of its centre shift and its size change, in a's size."""
    size = max(a[2] - a[0], a[3] - a[1], 1e-6)
    shift = float(np.linalg.norm((b[:2] + b[2:]) / 2 - (a[:2] + a[2:]) / 2)) / size
    return max(shift, abs(max(b[2] - b[0], b[3] - b[1]) / size - 1))


def refine_positions(sampled: Sequence[int], boxes: np.ndarray, detected: np.ndarray,
                     shots: Sequence[int] | None = None) -> list[int]:
    """The frames between sampled ones that MTCNN should see too: every frame between two neighbouring
    sampled frames when the track was not found on one of them, or its box changed between them by more
    than ``REFINE_CHANGE`` of its size (centre shift or size change): no interpolation there. With
    ``shots`` (of the sampled frames), not between two frames of shots where the track is not: a track
    never leaves its shot, so MTCNN would look for it there in vain."""
    main = {shots[k] for k in np.flatnonzero(detected)} if shots is not None and np.any(detected) else None
    out: list[int] = []
    for k in range(len(sampled) - 1):
        a, b = sampled[k], sampled[k + 1]
        if main is not None and shots[k] not in main and shots[k + 1] not in main:
            continue
        if b - a > 1 and (not (detected[k] and detected[k + 1]) or _change(boxes[k], boxes[k + 1]) > REFINE_CHANGE):
            out += range(a + 1, b)
    return out


def fill_boxes(times: Sequence[float], sampled: Sequence[int], boxes: np.ndarray, detected: np.ndarray,
               shots: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and states (DETECTED ... UNSEEN) for all frames from the track on the ``sampled`` ones.

    ``times[i]`` is frame i's time (increasing), ``shots[i]`` its shot (default: one shot), ``sampled``
    the sorted frames that were detected on, ``boxes`` / ``detected`` the track there. A frame between
    two sampled frames of its shot where the face was found gets the box interpolated linearly in time
    (INTERPOLATED); any other frame borrows the box of the nearest frame of its shot where it was
    found, as `track_boxes` does (BORROWED), or gets NaN where it is in no frame of the shot (UNSEEN).
    """
    n = len(times)
    sampled = list(sampled)
    shots = np.zeros(n, np.int64) if shots is None else np.asarray(shots)
    if len(sampled) != len(boxes) or len(boxes) != len(detected):
        raise ValueError("fill_boxes: sampled, boxes and detected must have one entry per sampled frame")
    if len(shots) != n:
        raise ValueError(f"fill_boxes: {len(shots)} shots for {n} frames")
    if any(b <= a for a, b in zip(sampled, sampled[1:])) or (sampled and not 0 <= sampled[0] <= sampled[-1] < n):
        raise ValueError(f"fill_boxes: sampled frames must be increasing positions in [0, {n})")
    out = np.zeros((n, 4), np.float64)
    state = np.full(n, UNSEEN, np.int64)
    out[sampled] = boxes
    state[sampled] = np.where(detected, DETECTED, UNSEEN)
    for (a, ba, da), (b, bb, db) in zip(zip(sampled, boxes, detected), zip(sampled[1:], boxes[1:], detected[1:])):
        if not (da and db) or shots[a] != shots[b]:
            continue
        span = float(times[b]) - float(times[a])
        for i in range(a + 1, b):
            w = (float(times[i]) - float(times[a])) / span if span > 0 else 0.0
            out[i], state[i] = (1 - w) * ba + w * bb, INTERPOLATED
    found = state >= INTERPOLATED
    if not found.any():
        return out, state
    out = _borrow(out, found, shots)
    state[~found & ~np.isnan(out[:, 0])] = BORROWED
    return out, state


def square_box(box: np.ndarray, margin: float) -> np.ndarray:
    """Widen a box by ``margin`` of its size on each side, then make it square around its centre."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def crop(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crop ``box`` (may reach outside the frame: black there) and resize to ``size`` x ``size``."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    img = Image.fromarray(frame).crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def centre_square(width: int, height: int) -> np.ndarray:
    side = min(width, height)
    x1, y1 = (width - side) / 2, (height - side) / 2
    return np.array([x1, y1, x1 + side, y1 + side], np.float64)


Detections = tuple[list[np.ndarray], list[np.ndarray]]   # per frame: [k, 4] boxes in frame pixels, [k] probabilities


Small = tuple[np.ndarray, float, float]   # frames downscaled for MTCNN, and the factors (x, y) back to frame pixels


def detection_frames(frames: np.ndarray, side: int) -> Small:
    """The frames ([N, H, W, 3] uint8) downscaled to `side` (longest side) for MTCNN, and the factors back
    to frame pixels; frames no larger are returned as they are."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [N, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    scale = min(1.0, side / max(h, w))
    if scale >= 1.0 or len(frames) == 0:
        return frames, 1.0, 1.0
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.stack([np.asarray(Image.fromarray(f).resize((sw, sh), Image.BILINEAR)) for f in frames])
    return small, w / sw, h / sh


class FaceDetector:
    """MTCNN, loaded once on ``device``; ``track`` turns the frames of one clip into face crops,
    ``track_many`` those of several clips with one batched MTCNN pass (worth it on a GPU)."""

    def __init__(self, settings: FaceSettings = FaceSettings(), device: str = "cpu", threads: int = 1):
        if settings.detector != "mtcnn":
            raise ValueError(f"unknown face detector {settings.detector!r}: only 'mtcnn' is available")
        if settings.track_by not in TRACK_BY:
            raise ValueError(f"unknown track_by {settings.track_by!r}: choose one of {', '.join(TRACK_BY)}")
        if settings.detect_every < 1:
            raise ValueError(f"detect_every must be at least 1, got {settings.detect_every}")
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:  # pragma: no cover - environment problem
            raise ImportError(
                "facenet-pytorch is needed for face detection: pip install --no-deps facenet-pytorch"
            ) from e
        self.settings = settings
        self.device = device
        self.threads = max(1, threads)   # for the CPU work of several clips at once (`each`)
        self.work = DetectWork()
        self.mtcnn = MTCNN(
            keep_all=True, min_face_size=settings.min_face_size, thresholds=list(settings.thresholds),
            post_process=False, device=device,
        )

    def _small(self, frames: np.ndarray) -> Small:
        return detection_frames(frames, self.settings.detect_side)

    def mtcnn_detect(self, frames: np.ndarray) -> tuple[list, list]:
        """One MTCNN call on same-sized frames: what facenet-pytorch's ``MTCNN.detect`` returns, with its
        candidate crops made in one batched operation (`extract.mtcnn`: same values, far fewer kernels)."""
        from emollama.extract.mtcnn import detect as detect_batched   # imports torch

        return detect_batched(self.mtcnn, frames)

    def detect(self, frames: np.ndarray) -> Detections:
        """Per-frame boxes ([k, 4] in frame pixels) and probabilities ([k]) for same-sized frames."""
        return self.detect_many([frames])[0]

    def detect_many(self, clips: Sequence[np.ndarray], smalls: Sequence[Small] | None = None) -> list[Detections]:
        """`detect` for several clips (each [N, H, W, 3] uint8) in as few MTCNN calls as their
        detection sizes allow: clips whose downscaled frames share a size go through together, up to
        DETECT_CHUNK frames a call. (A frame's result can differ slightly with the batch: `track_many`.)
        ``smalls``: the clips' `detection_frames`, when they were made already."""
        smalls = self.each(self._small, clips) if smalls is None else smalls
        out: list[Detections] = [([], []) for _ in clips]
        groups: dict[tuple[int, int], list[int]] = {}
        for ci, (small, _, _) in enumerate(smalls):
            if len(small):
                groups.setdefault(small.shape[1:3], []).append(ci)
        for (sh, sw), members in groups.items():
            batch = np.concatenate([smalls[ci][0] for ci in members]) if len(members) > 1 else smalls[members[0]][0]
            boxes: list = []
            probs: list = []
            for k in range(0, len(batch), DETECT_CHUNK):
                chunk = batch[k:k + DETECT_CHUNK]
                b, p = self.mtcnn_detect(chunk)
                boxes += list(b)
                probs += list(p)
                self.work.calls += 1
                self.work.frames += len(chunk)
                self.work.pixels += len(chunk) * sh * sw
            start = 0
            for ci in members:
                small, sx, sy = smalls[ci]
                for b, p in zip(boxes[start:start + len(small)], probs[start:start + len(small)]):
                    if b is None or len(b) == 0:
                        out[ci][0].append(np.zeros((0, 4)))
                        out[ci][1].append(np.zeros(0))
                        continue
                    out[ci][0].append(np.asarray(b, float).reshape(-1, 4) * np.array([sx, sy, sx, sy]))
                    out[ci][1].append(np.asarray(p, float).reshape(-1))
                start += len(small)
        return out

    def track(self, frames: np.ndarray, times: Sequence[float] | None = None,
              shots: Sequence[int] | None = None) -> FaceTrack:
        """Face crops of the main face in every frame of one clip (frames share one size).

        ``times``: each frame's time (e.g. its frame index), for interpolating boxes between detected
        frames; default: evenly spaced. ``shots``: each frame's shot; default: `shot_ids` of these
        frames with the settings' ``cut_distance``."""
        return self.track_many([frames], [times], shots=[shots])[0]

    def each(self, fn: Callable[[Any], Any], items: Sequence) -> list:
        """`[fn(x) for x in items]`, on `threads` threads when there are several items: the CPU work
        around MTCNN (downscaling, looks, crops) of a batch of clips, while MTCNN itself is one call
        (PIL releases the GIL while it resizes; each item's result does not depend on the others)."""
        if self.threads <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.threads, len(items)), thread_name_prefix="faces") as pool:
            return list(pool.map(fn, items))

    def track_many(self, clips: Sequence[np.ndarray], times: Sequence[Sequence[float] | None] | None = None,
                   smalls: Sequence[Small] | None = None,
                   shots: Sequence[Sequence[int] | None] | None = None) -> list[FaceTrack]:
        """`track` for several clips, their MTCNN work batched across clips (`detect_many`: on a GPU,
        one pass for many clips). Each track is what `track` gives for its clip alone up to MTCNN's
        float differences between batch compositions, which can tip a detection: on the CPU, 1 box of
        240 on the real samples moved by 6 px. So values depend on which clips share a batch: where
        stores must be bit-identical whatever the grouping (the CPU), track clip by clip.

        MTCNN runs on `detect_positions` (every ``detect_every``-th frame), then once more, for all the
        clips together, on the frames that `refine_positions` asks for: those between two detected
        frames where the track was lost on either side or moved too much to interpolate.

        ``smalls``: each clip's frames as `detection_frames` makes them for ``detect_side``, when the
        process that decoded them made them too (the extraction step's preparation processes).
        ``shots``: each clip's shot per frame (`shot_ids`), when the caller has them (from more frames
        than these: the step cuts over every decoded frame); None: from these frames."""
        st = self.settings
        times = [None] * len(clips) if times is None else list(times)
        shots = [None] * len(clips) if shots is None else list(shots)
        if len(times) != len(clips) or len(shots) != len(clips):
            raise ValueError(f"track_many: {len(times)} time lists and {len(shots)} shot lists for {len(clips)} clips")
        times = [list(range(len(f))) if t is None else list(t) for f, t in zip(clips, times)]
        for f, t in zip(clips, times):
            if len(f) == 0:
                raise ValueError("track: no frames")
            if len(t) != len(f):
                raise ValueError(f"track: {len(t)} times for {len(f)} frames")
        shots = self.each(lambda ci: shot_ids(clips[ci], st.cut_distance) if shots[ci] is None
                          else np.asarray(shots[ci], np.int64), range(len(clips)))
        if [len(s) for s in shots] != [len(f) for f in clips]:
            raise ValueError("track_many: the shots do not match the clips' frames")
        if smalls is not None and [len(s[0]) for s in smalls] != [len(f) for f in clips]:
            raise ValueError("track_many: the downscaled frames do not match the clips' frames")
        found: list[dict[int, tuple[np.ndarray, np.ndarray, list | None]]] = [{} for _ in clips]
        todo = [detect_positions(len(f), st.detect_every) for f in clips]
        result: list[tuple[list[int], np.ndarray | None, np.ndarray | None]] = [([], None, None)] * len(clips)
        for pass_ in range(2):
            dets = self.detect_many([f[p] for f, p in zip(clips, todo)],
                                    None if smalls is None else [(s[p], sx, sy) for (s, sx, sy), p in zip(smalls, todo)])

            def follow(ci: int) -> list[int]:
                """Clip ci's track from its detections so far; the positions still to detect (pass 0)."""
                for pos, b, pr in zip(todo[ci], *dets[ci]):
                    looks = [appearance(clips[ci][pos], x) for x in b] if st.track_by == "appearance" else None
                    found[ci][pos] = (b, pr, looks)
                pos = sorted(found[ci])
                try:
                    raw, detected = track_boxes([found[ci][p][0] for p in pos], [found[ci][p][1] for p in pos],
                                                [found[ci][p][2] for p in pos] if st.track_by == "appearance" else None,
                                                st.appearance_min, shots[ci][pos])
                except ValueError:   # no face in any detected frame
                    raw, detected = np.zeros((len(pos), 4)), np.zeros(len(pos), bool)
                result[ci] = (pos, raw, detected)
                return refine_positions(pos, raw, detected, shots[ci][pos]) if pass_ == 0 else []

            todo = self.each(follow, range(len(clips)))
            if not any(todo):
                break
        return self.each(lambda ci: self._crops(clips[ci], times[ci], shots[ci], *result[ci]), range(len(clips)))

    def _crops(self, frames: np.ndarray, times: list, shots: np.ndarray, pos: list[int], raw: np.ndarray,
               detected: np.ndarray) -> FaceTrack:
        st = self.settings
        n, h, w = frames.shape[:3]
        whole = centre_square(w, h)
        if not detected.any():
            log.info("no face found in %d frames: using centre squares of the whole frames", n)
            crops = np.stack([crop(f, whole, st.crop_size) for f in frames])
            return FaceTrack(crops, np.tile(whole, (n, 1)), np.full(n, UNSEEN, np.int64), shots, False)
        raw, state = fill_boxes(times, pos, raw, detected, shots)
        boxes = np.stack([whole if s == UNSEEN else square_box(b, st.margin) for b, s in zip(raw, state)])
        crops = np.stack([crop(f, b, st.crop_size) for f, b in zip(frames, boxes)])
        return FaceTrack(crops, boxes, state, shots, True)


def peak_index(crops: np.ndarray) -> int:
    """The frame whose face differs most from the clip's mean face (64x64 grayscale, L2)."""
    if len(crops) == 0:
        raise ValueError("peak_index: no crops")
    if len(crops) == 1:
        return 0
    gray = np.stack([
        np.asarray(Image.fromarray(c).convert("L").resize((64, 64), Image.BILINEAR), np.float32) for c in crops
    ])
    dist = ((gray - gray.mean(axis=0)) ** 2).sum(axis=(1, 2))
    return int(np.argmax(dist))


def peak_frame_index(track: FaceTrack) -> int:
    """Index of the "peak" frame of a track (the global view's frame with `global_frame = "peak"`).

    It looks only at frames where the face was detected (borrowed boxes may show no face), unless no
    face was found at all. ("first" and "middle" are the clip's own frames: the step picks them.)
    """
    n = len(track.crops)
    if n == 0:
        raise ValueError("peak_frame_index: empty track")
    idx = np.flatnonzero(track.detected) if track.found else np.arange(n)
    if len(idx) == 0:
        idx = np.arange(n)
    return int(idx[peak_index(track.crops[idx])])

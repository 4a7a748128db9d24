"""Face detection, tracking and cropping with facenet-pytorch's MTCNN.

All sampled frames of a clip go through MTCNN in one batched call (downscaled to
``detect_side`` for speed). The main face is the largest confident face of the clip;
it is then followed frame to frame by overlap and centre distance, so a second person
who is briefly larger does not steal the track. A frame where the tracked face is not
found borrows the box of the nearest frame where it was. The box is widened by
``margin`` on each side, made square and cropped (parts outside the frame are black),
then resized to ``crop_size``.

When no face is found in any frame, the crops are centre squares of the whole frames
(side = the frame's shorter side) resized to ``crop_size``, and ``FaceTrack.found`` is
False so the caller can record it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from emollama.extract.registry import FACE_INPUTS
from emollama.extract.settings import value

log = logging.getLogger(__name__)

CONFIDENT = 0.99  # MTCNN probability for a face to seed the track (backs of heads score ~0.8-0.96)
MAX_CENTRE_JUMP = 1.0  # accept a match whose centre moved at most this many box sizes


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d


@dataclass
class FaceTrack:
    crops: np.ndarray  # [N, crop, crop, 3] uint8
    boxes: np.ndarray  # [N, 4] float x1, y1, x2, y2 in frame pixels: the square actually cropped
    detected: np.ndarray  # [N] bool: the tracked face was detected in this frame
    found: bool  # any face at all; False => crops are centre squares of the whole frames


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match(ref: np.ndarray, cands: np.ndarray) -> int | None:
    """The candidate box that continues ``ref`` best, or None when none is close enough."""
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
        if score > best_score:
            best, best_score = i, score
    return best


def track_boxes(per_frame: list[np.ndarray], probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Follow the main face through per-frame detections.

    ``per_frame[i]`` is a [k, 4] array of boxes in frame i, ``probs[i]`` their [k]
    probabilities. Returns ([N, 4] boxes, [N] detected); boxes of undetected frames are
    borrowed from the nearest detected frame (the earlier one on a tie). Raises
    ValueError when no frame has a face.
    """
    n = len(per_frame)
    cands = [(i, j) for i in range(n) for j in range(len(per_frame[i]))]
    if not cands:
        raise ValueError("no face in any frame")
    area = lambda b: float((b[2] - b[0]) * (b[3] - b[1]))  # noqa: E731
    confident = [(i, j) for i, j in cands if probs[i][j] >= CONFIDENT] or cands
    si, sj = max(confident, key=lambda ij: area(per_frame[ij[0]][ij[1]]))
    boxes = np.zeros((n, 4), np.float64)
    detected = np.zeros(n, bool)
    boxes[si], detected[si] = per_frame[si][sj], True
    for order in (range(si + 1, n), range(si - 1, -1, -1)):
        ref = boxes[si]
        for i in order:
            j = _match(ref, per_frame[i])
            if j is not None:
                boxes[i], detected[i] = per_frame[i][j], True
                ref = boxes[i]
    hit = np.flatnonzero(detected)
    for i in np.flatnonzero(~detected):
        boxes[i] = boxes[hit[np.argmin(np.abs(hit - i))]]
    return boxes, detected


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


class FaceDetector:
    """MTCNN, loaded once; ``track`` turns the frames of one clip into face crops."""

    def __init__(self, settings: FaceSettings = FaceSettings(), device: str = "cpu"):
        if settings.detector != "mtcnn":
            raise ValueError(f"unknown face detector {settings.detector!r}: only 'mtcnn' is available")
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:  # pragma: no cover - environment problem
            raise ImportError(
                "facenet-pytorch is needed for face detection: pip install --no-deps facenet-pytorch"
            ) from e
        self.settings = settings
        self.device = device
        self.mtcnn = MTCNN(
            keep_all=True, min_face_size=settings.min_face_size, thresholds=list(settings.thresholds),
            post_process=False, device=device,
        )

    def detect(self, frames: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-frame boxes ([k, 4] in frame pixels) and probabilities ([k]) for same-sized frames."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be [N, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
        n, h, w = frames.shape[:3]
        scale = min(1.0, self.settings.detect_side / max(h, w))
        if scale < 1.0:
            sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
            small = np.stack([np.asarray(Image.fromarray(f).resize((sw, sh), Image.BILINEAR)) for f in frames])
            sx, sy = w / sw, h / sh
        else:
            small, sx, sy = frames, 1.0, 1.0
        boxes, probs = self.mtcnn.detect(small)
        out_b, out_p = [], []
        for b, p in zip(boxes, probs):
            if b is None or len(b) == 0:
                out_b.append(np.zeros((0, 4)))
                out_p.append(np.zeros(0))
                continue
            b = np.asarray(b, float).reshape(-1, 4) * np.array([sx, sy, sx, sy])
            out_b.append(b)
            out_p.append(np.asarray(p, float).reshape(-1))
        return out_b, out_p

    def track(self, frames: np.ndarray) -> FaceTrack:
        """Face crops of the main face in every frame of one clip (frames share one size)."""
        st = self.settings
        n, h, w = frames.shape[:3]
        if n == 0:
            raise ValueError("track: no frames")
        per_frame, probs = self.detect(frames)
        try:
            raw, detected = track_boxes(per_frame, probs)
        except ValueError:
            log.info("no face found in %d frames: using centre squares of the whole frames", n)
            box = centre_square(w, h)
            crops = np.stack([crop(f, box, st.crop_size) for f in frames])
            return FaceTrack(crops, np.tile(box, (n, 1)), np.zeros(n, bool), False)
        boxes = np.stack([square_box(b, st.margin) for b in raw])
        crops = np.stack([crop(f, b, st.crop_size) for f, b in zip(frames, boxes)])
        return FaceTrack(crops, boxes, detected, True)


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

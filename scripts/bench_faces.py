"""Benchmark the face stage (not a test): cheaper face settings against today's full detection.

    python scripts/bench_faces.py [--samples ../shared/samples/mer2023-examples] [--threads 1] [--all]
                                  [--device cpu|cuda]

Every real sample clip is decoded as the extraction step decodes it (the same frames, the same anchor
frames: the 16 local frames plus the first frame of each temporal segment). Then each candidate face
setting tracks the face on those anchor frames, and is compared frame by frame with the reference,
today's detection before this change: MTCNN on every anchor frame at detect_side 640, matched by
position only.

Columns:
- MTCNN frames / Mpx: how many frames, and how many megapixels of detection images, MTCNN was given
  (all clips). A measure of the work that does not depend on the machine's load; "work" is the
  reference's pixels over the candidate's.
- face s / speed-up: wall time of `FaceDetector.track` (downscale, MTCNN, tracking, crops) summed
  over the clips, and the reference's over the candidate's. Candidates run clip by clip in turn, so
  a change of load touches them alike; still, read it on a quiet machine.
- IoU mean / p10: IoU of the cropped square with the reference's, per anchor frame (all clips).
- moved: the share of anchor frames whose crop moved by more than 10% of the box: the centre by more
  than 0.1 x the reference's side, or the side by more than 10%.
- detected: the share of anchor frames where the tracked face was found (or interpolated between two).

Rows to read beside the others: "appearance" is today's detection with the scene-cut fix only (the
frames it moves are the ones after the cut in samplenew_00061200, on purpose); "side 600" is how much
MTCNN's boxes move when the image is merely 6% smaller: the detector's own jitter, a floor for any
change of detect_side. "every k" rows include the frames detected again where the track is lost or
moves (faces.refine_positions). The default settings' row is in bold.

Last, the default settings once more through `FaceDetector.track_many`, all clips at once (MTCNN
batched across the clips whose detection images share a size): its wall time and MTCNN calls beside
the clip-by-clip run. With --device cuda everything runs on the GPU (MTCNN's device in extraction is
the encoders' device): the batched row is the one that matters there.

One torch thread by default (as the tests do): with 2 shared cores, MTCNN's own threads only add noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "samples" / "mer2023-examples"

# name -> FaceSettings fields changed from the reference (today's detection); the rest are defaults.
REFERENCE = {"detect_side": 640, "detect_every": 1, "track_by": "position"}
CANDIDATES = {
    "today (reference)": {},
    "appearance": {"track_by": "appearance"},
    "side 600": {"track_by": "appearance", "detect_side": 600},
    "side 480": {"track_by": "appearance", "detect_side": 480},
    "side 320": {"track_by": "appearance", "detect_side": 320},
    "every 2": {"track_by": "appearance", "detect_every": 2},
    "every 3": {"track_by": "appearance", "detect_every": 3},
    "every 4": {"track_by": "appearance", "detect_every": 4},
    "side 480, every 3": {"track_by": "appearance", "detect_side": 480, "detect_every": 3},
}
MORE = {
    "side 400": {"track_by": "appearance", "detect_side": 400},
    "every 6": {"track_by": "appearance", "detect_every": 6},
    "side 480, every 2": {"track_by": "appearance", "detect_side": 480, "detect_every": 2},
    "side 320, every 3": {"track_by": "appearance", "detect_side": 320, "detect_every": 3},
}


@dataclasses.dataclass
class Clip:
    name: str
    frames: np.ndarray   # the anchor frames [N, H, W, 3]
    times: list[int]     # their frame indices


def load_clips(folder: Path) -> list[Clip]:
    """The anchor frames of every clip, chosen and decoded as extract.step.prepare does."""
    from emollama.extract import decode
    from emollama.extract.step import TEMPORAL_PER_SEGMENT, FrameSettings, frame_plan

    fr = FrameSettings()
    clips = []
    for path in sorted(folder.glob("*.mp4")):
        info = decode.probe(path)
        wanted, local_pos, temporal_pos = frame_plan(info.n_frames, fr)
        frames = decode.read_frames(path, wanted, max_side=fr.max_side, info=info)
        anchors = sorted(set(local_pos) | set(temporal_pos[::TEMPORAL_PER_SEGMENT]))
        clips.append(Clip(path.stem, frames[anchors], [wanted[a] for a in anchors]))
    return clips


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2, y2 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def moved(ref: np.ndarray, got: np.ndarray, share: float = 0.1) -> np.ndarray:
    """Per frame: the crop's centre moved by more than `share` of the reference's side, or its side
    changed by more than `share`."""
    side = ref[:, 2] - ref[:, 0]
    shift = np.linalg.norm((got[:, :2] + got[:, 2:]) / 2 - (ref[:, :2] + ref[:, 2:]) / 2, axis=1)
    return (shift > share * side) | (np.abs((got[:, 2] - got[:, 0]) / side - 1) > share)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="a folder of real .mp4 clips")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the tests)")
    ap.add_argument("--all", action="store_true", help="also side 400, every 6 and two more combinations")
    ap.add_argument("--device", default="cpu", help="MTCNN's device: cpu (default) or cuda")
    args = ap.parse_args()

    import torch

    from emollama.extract.faces import FaceDetector, FaceSettings

    torch.set_num_threads(args.threads)
    if not args.samples.is_dir() or not any(args.samples.glob("*.mp4")):
        raise SystemExit(f"no .mp4 clips in {args.samples}: give --samples")
    t = time.perf_counter()
    clips = load_clips(args.samples)
    n_frames = sum(len(c.frames) for c in clips)
    print(f"{len(clips)} clips, {n_frames} anchor frames decoded in {time.perf_counter() - t:.1f} s "
          f"(torch threads: {args.threads}, device: {args.device})")

    cands = {**CANDIDATES, **(MORE if args.all else {})}
    settings = {name: FaceSettings(**{**REFERENCE, **change}) for name, change in cands.items()}
    detectors = {name: FaceDetector(s, device=args.device) for name, s in settings.items()}
    for det in detectors.values():   # warm-up (CUDA context, kernels), outside the timing
        det.track(clips[0].frames[:2])
        det.work = type(det.work)()
    wall = {name: 0.0 for name in cands}
    boxes: dict[str, list[np.ndarray]] = {name: [] for name in cands}
    detected: dict[str, list[np.ndarray]] = {name: [] for name in cands}
    for clip in clips:
        for name, det in detectors.items():   # candidates in turn on each clip: a load change touches them alike
            t = time.perf_counter()
            track = det.track(clip.frames, clip.times)
            wall[name] += time.perf_counter() - t
            boxes[name].append(track.boxes)
            detected[name].append(track.detected)
        print(f"  {clip.name}: done", flush=True)

    ref_name = next(iter(cands))
    ref = np.concatenate(boxes[ref_name])
    ref_px = detectors[ref_name].work.pixels
    rows = []
    for name in cands:
        got = np.concatenate(boxes[name])
        iou = box_iou(ref, got)
        w = detectors[name].work
        s = settings[name]
        label = f"**{name} (default)**" if s == FaceSettings() else name
        rows.append([label, str(s.detect_side), str(s.detect_every), s.track_by, str(w.frames),
                     f"{w.pixels / 1e6:.1f}", f"{ref_px / w.pixels:.2f}x", f"{wall[name]:.1f}",
                     f"{wall[ref_name] / wall[name]:.2f}x", f"{iou.mean():.3f}", f"{np.percentile(iou, 10):.3f}",
                     f"{100 * moved(ref, got).mean():.1f}%", f"{100 * np.concatenate(detected[name]).mean():.1f}%"])
    head = ["candidate", "detect_side", "every", "track_by", "MTCNN frames", "Mpx", "work", "face s",
            "speed-up", "IoU mean", "IoU p10", "moved", "detected"]
    print(f"\nfaces on {len(clips)} real clips ({n_frames} anchor frames), against today's detection "
          f"(detect_side 640, every frame, by position):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    per_clip = []
    for name in cands:
        worst = min(range(len(clips)), key=lambda i: box_iou(boxes[ref_name][i], boxes[name][i]).mean())
        per_clip.append(f"{name}: {clips[worst].name} "
                        f"{box_iou(boxes[ref_name][worst], boxes[name][worst]).mean():.3f}")
    print("\nworst clip (mean IoU) per candidate: " + "; ".join(per_clip))

    default = next((n for n in cands if settings[n] == FaceSettings()), None)
    if default is not None:
        det = FaceDetector(FaceSettings(), device=args.device)
        det.track(clips[0].frames[:2])
        det.work = type(det.work)()
        t = time.perf_counter()
        tracks = det.track_many([c.frames for c in clips], [c.times for c in clips])
        batched = time.perf_counter() - t
        diff = max(float(np.abs(tr.boxes - b).max()) for tr, b in zip(tracks, boxes[default]))
        one_by_one = detectors[default].work
        print(f"\n{default}, clip by clip: {wall[default]:.1f} s, {one_by_one.calls} MTCNN calls; all clips at once "
              f"(track_many): {batched:.1f} s, {det.work.calls} MTCNN calls, {det.work.frames} frames; "
              f"largest box difference {diff:.2g} px")


if __name__ == "__main__":
    main()

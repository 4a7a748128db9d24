"""The extraction step: a batch of clips in, feature rows committed to the store out.

This module knows nothing about executors: `pipeline` hands batches of clips to `run_batch`
in-process or on dask workers. Each worker process loads its models once (`models()` keeps them)
and encodes micro-batches of clips while `prep_workers` preparation processes (`extract.prep`)
decode the clips after them. Faces are tracked where `faces.detect_on` says (`detect_on`): clip by
clip in the preparation processes, which then also cut the crops ("prep", the default on a CPU), or
for the clips of several micro-batches (`face_group`) in one MTCNN pass on the encoders' device
(`track_faces`; "encoder", the default on a GPU).

Faces take one or two looks at a clip (`Look`: frames of a plan, decoded, their shots, the face track
over its anchor frames). The first is the planned frames of the whole clip; its track gives the
record (where the main face was detected, interpolated or absent, and the shots). When the main face
is not present in every anchor frame (another shot, or it left the frame), the face frames and the
face clip are planned again inside the span where it is (`span_plan`), decoded and tracked: a second
look, which gives the face inputs. So no face crop comes from a shot without the main face
(`use_track`).

A clip that lacks only some sets (`ClipJob.views`: e.g. the ASR text set added to a store whose clips
have the others) runs only those encoders; when none of them reads frames, only its waveform is decoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from emollama.corpora import source_has_sound
from emollama.extract import decode, faces, perturb, prep
from emollama.extract.encoders import EncodersConfig, file_sha256, load_encoders
from emollama.extract.registry import (FACE_CLIP, FACE_FRAMES, FACE_INPUTS, FRAME, WAVEFORM, EncoderInfo, gpu_visible,
                                      resolve_device, torch_threads)
from emollama.extract.settings import policy, runtime, section, spec_attrs, spec_params, value
from emollama.store import FeatureSpec, FeatureStore
from emollama.store import text as text_rows

log = logging.getLogger(__name__)

GLOBAL_FRAMES = ("first", "middle", "peak")
# The temporal input: the middle frame of each of 8 segments and the next one = VideoMAE's 16 frames.
# Fixed, not a setting: its anchor frames also seed the face track that every face input is cropped with.
TEMPORAL_SEGMENTS = 8
TEMPORAL_PER_SEGMENT = 2
FACE_THREADS = 8   # at most this many threads for the CPU work around a face group's MTCNN pass (detect_on = encoder)
# detect_on = encoder: the faces of at least this many clips (whole micro-batches) are found together,
# one MTCNN pass and FACE_THREADS threads for them. On an H200 with micro-batches of 4, faces cost the
# encoding process 0.086 s a clip; found for 16 clips at once, 0.060 s (bench-gpu: 6.7 -> 8.6 clips/s).
FACE_GROUP = 16
# the default of `cpu_threads`: fixed, not the machine's cores, so that a store's CPU sets mean the same
# on every machine and executor. One thread never oversubscribes a core and scales by processes
# (`--workers N` on N cores); its cost in one process and the measurements: docs/design.md "One key, one
# meaning"
CPU_THREADS = 1


@dataclass(frozen=True)
class FrameSettings:
    """[extract.frames]: which frames each input is made of.

    local_frames also gives the candidates of the peak frame. Known gap, kept so that existing keys
    stay as they are: the face track runs over the anchor frames of both face inputs, so local_frames
    can also move a face-clip crop (where a frame borrows a neighbour's box), and the face-clip key
    does not hold it."""

    local_frames: int = value(16, inputs={FACE_FRAMES: "count", FRAME: "candidates"}, min=1)   # face frames, uniform
    global_frame: str = value("peak", inputs={FRAME: "select"}, choices=GLOBAL_FRAMES)           # first | middle | peak
    max_side: int = value(1280, inputs=(FACE_FRAMES, FACE_CLIP, FRAME), min=1)   # larger frames: downscaled
    folder_fps: float = policy(25.0, min=1e-3)   # frame rate assumed for folders of frames (DFEW): only recorded

    def to_dict(self) -> dict:
        return asdict(self)


# What each input's preparation fixes (no setting changes it), beside what the value fields give.
INPUT_FIXED: dict[str, dict[str, Any]] = {
    WAVEFORM: {},
    FACE_FRAMES: {"frames": {"sampling": "uniform"}},
    FACE_CLIP: {"frames": {"sampling": "segment_pairs", "segments": TEMPORAL_SEGMENTS,
                           "per_segment": TEMPORAL_PER_SEGMENT}},
    FRAME: {},
}


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """The `[extract]` settings of the step itself (the pipeline's ExtractConfig adds where the job runs)."""

    frames: FrameSettings = section(FrameSettings, param="frames")
    faces: faces.FaceSettings = section(faces.FaceSettings, param="faces")
    perturb: perturb.PerturbSettings = section(perturb.PerturbSettings, param="perturb")   # off: robustness only
    sample_rate: int = value(16000, inputs=(WAVEFORM,), choices=(16000,))   # what the encoders were trained on
    dtype: str = value("float16", spec="dtype", choices=("float16", "float32"))   # storage dtype
    # a clip with no sound: fail | silence | auto (silence for frame folders)
    missing_audio: str = policy("auto", choices=("auto", "fail", "silence"))
    offline: bool | None = policy(None)         # None: HF_HUB_OFFLINE decides
    device: str = runtime("auto")               # auto | cpu | cuda | cuda:N (the encoders' device)
    batch_size: int = runtime(32, min=1)        # encoder batch size (images)
    micro_batch: int = runtime(4, min=1)        # clips encoded together
    # processes that decode clips and crop faces for each encoding worker; unset: the worker's cores
    # (its torch threads); 0: one thread of the encoding process (extract.prep)
    prep_workers: int | None = runtime(None, min=0)
    max_pixels: int = runtime(decode.DEFAULT_MAX_PIXELS, min=0)   # a larger decoded frame fails the clip (0: no limit)
    # torch intra-op threads of the encoders (and of MTCNN on the encoding side) on a CPU. Float sums
    # depend on the thread count, so every executor computes with this one and a CPU set records it in
    # its key: one key, one meaning (`--workers 2` and in-process agree bit for bit). A GPU ignores it.
    cpu_threads: int = value(CPU_THREADS, spec="compute", min=1, max=256)


@dataclass(frozen=True, kw_only=True)
class ExtractSettings(StepSettings):
    """Everything a worker needs to turn clips into features; hashable, so workers cache models by it."""

    encoders: EncodersConfig = value(None, spec="encoder")


def input_params(settings: StepSettings, kind: str) -> dict[str, Any]:
    """The spec params of sets read from input `kind`: what its preparation fixes plus the value fields
    that name it (`extract.settings.spec_params`)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in INPUT_FIXED[kind].items()}
    for k, v in spec_params(settings, kind).items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    if isinstance(out.get("faces"), dict):
        # where MTCNN ran, resolved: absent for clip by clip in the preparation processes, so the keys made
        # before the setting existed (which all detected clip by clip) still name those sets
        where = detect_on(settings)
        out["faces"] = {k: v for k, v in out["faces"].items() if k != "detect_on"} | \
            ({"detect_on": where} if where != "prep" else {})
    if kind == FRAME and settings.frames.global_frame != "peak":
        out["faces"] = None   # the first / middle frame does not depend on the faces
    return out


def detect_on(settings: StepSettings) -> str:
    """Where MTCNN runs for these settings: "prep" (each clip alone, on a preparation process's CPU) or
    "encoder" (the frames of `face_group` clips together, on the encoders' device). `faces.detect_on = "auto"`
    is "encoder" when the encoders' device is a GPU, as seen from this process (`device = "auto"`: the
    driver shows a GPU here, `registry.gpu_visible`); the pipeline resolves it once, before the keys are
    made, and sends it resolved to the workers."""
    where = settings.faces.detect_on
    if where != "auto":
        return where
    gpu = gpu_visible() if settings.device == "auto" else settings.device.startswith("cuda")
    return "encoder" if gpu else "prep"


def resolved(settings: ExtractSettings) -> ExtractSettings:
    """`settings` with `faces.detect_on` resolved (`detect_on`): what workers get, so that none resolves
    "auto" against its own device."""
    where = detect_on(settings)
    if where == settings.faces.detect_on:
        return settings
    return dataclasses.replace(settings, faces=dataclasses.replace(settings.faces, detect_on=where))


@dataclass(frozen=True)
class ClipJob:
    id: str
    source: str
    replace: bool = False   # the clip has features from an earlier version of its source: keep them until
                            # the new ones are committed (a failure then leaves the old ones and their record)
    has_sound: bool | None = None   # the dataset's declaration (corpora); None: the source decides
    views: tuple[str, ...] | None = None   # the encoder entries to run (the clip lacks only their sets); None: all

    def sound_expected(self) -> bool:
        return self.has_sound if self.has_sound is not None else source_has_sound(self.source)

    def wants(self, view: str) -> bool:
        return self.views is None or view in self.views

    def wants_frames(self, settings: "ExtractSettings") -> bool:
        """Whether an encoder this clip needs reads frames (else only its waveform is prepared: no faces)."""
        entries = getattr(settings, "encoders", None)
        return self.views is None or entries is None or any(
            e.input in FACE_INPUTS for e in entries if self.wants(e.name))


@dataclass
class BatchResult:
    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # stage -> seconds
    no_face: list[str] = field(default_factory=list)
    preview_failed: list[tuple[str, str]] = field(default_factory=list)   # side output only: the clip is ok
    kept: list[str] = field(default_factory=list)   # replacements that failed: the earlier features stay
    prep_workers: int = 0   # preparation processes that prepared the clips (0: a thread of this process)


# ---------------------------------------------------------------------------------------------
# Models, loaded once per process


@dataclass
class Models:
    encoders: dict[str, Any]
    detector: faces.FaceDetector
    specs: dict[str, FeatureSpec]   # output name ("audio.hubert.frames") -> spec
    threads: int | None = None      # torch intra-op threads while encoding (settings.cpu_threads on a CPU)
    perturb: perturb.PerturbSettings | None = None   # [extract.perturb] when on: applied just before encoding


_MODELS: dict[ExtractSettings, Models] = {}
_MODELS_LOCK = threading.Lock()   # a dask worker with several threads loads each model once


def models(settings: ExtractSettings) -> Models:
    """The encoders and face detector for `settings`, loaded on first use in this process."""
    with _MODELS_LOCK:
        return _load_models(settings)


def _load_models(settings: ExtractSettings) -> Models:
    if settings not in _MODELS:
        encs = load_encoders(settings.encoders, device=settings.device, offline=settings.offline,
                             batch_size=settings.batch_size)
        det = faces.FaceDetector(settings.faces, device=resolve_device(settings.device),
                                 threads=min(FACE_THREADS, prep.default_workers()))
        _MODELS.clear()   # one settings set per process at a time: free the previous models
        on_cpu = resolve_device(settings.device) == "cpu"
        _MODELS[settings] = Models(encs, det, build_specs(encs, settings), settings.cpu_threads if on_cpu else None,
                                   settings.perturb if settings.perturb.active else None)
    return _MODELS[settings]


def build_specs(encoders: Mapping[str, Any], settings: StepSettings) -> dict[str, FeatureSpec]:
    """One FeatureSpec per encoder output, holding everything that determines its values: the encoder's
    own (weights, layer, params, pooling, shape), its input's (`input_params`) and the value fields
    that become spec attributes (dtype). `encoders`: entry name (the view) -> Encoder, or its
    `EncoderInfo` (`Encoder.info()`, or the cache of `extract.encoders.known_outputs`: no model needed)."""
    attrs, specs = spec_attrs(settings), {}
    for view, enc in encoders.items():
        params = {**enc.params, **input_params(settings, enc.input_kind), "compute_dtype": enc.compute_dtype}
        if computes_on_cpu(enc):
            params["cpu_threads"] = settings.cpu_threads
        for out, info in enc.outputs.items():
            name = f"{view}.{enc.name}.{out}"
            text = {"dtype": text_rows.DTYPE} if info.pooling == text_rows.POOLING else {}   # bytes, not values
            specs[name] = FeatureSpec(
                name=name, modality=view, encoder=enc.name, weights=enc.weights, layer=enc.layer,
                pooling=info.pooling, shape=tuple(info.shape), **{**attrs, **text},
                frame_rate=enc.frame_rate if info.shape and info.shape[0] is None else None, params=params,
            )
    return specs


def computes_on_cpu(enc: Any) -> bool:
    """Whether `enc` (an Encoder or its EncoderInfo) computes on a CPU: its compute dtype is float32 there
    and float16 on a GPU (`registry.Encoder`), as the worker that described it saw it."""
    return enc.compute_dtype == "float32"


def describe(settings: ExtractSettings) -> dict[str, FeatureSpec]:
    """The feature specs these settings produce (loads the models of this process once)."""
    return models(settings).specs


def describe_encoders(settings: ExtractSettings) -> dict[str, EncoderInfo]:
    """What each encoder of these settings tells its specs (`build_specs(describe_encoders(s), s)` equals
    `describe(s)`), small enough to send back from a worker and to cache (loads the models once)."""
    return {view: enc.info() for view, enc in models(settings).encoders.items()}


# ---------------------------------------------------------------------------------------------
# The CPU half: decode, faces, choose frames


@dataclass
class Prepared:
    job: ClipJob
    record: dict
    # input kind -> this clip's input (extract.registry.INPUTS): the waveform, the face crops of the
    # local frames [N, crop, crop, 3], of the temporal frames [16, crop, crop, 3], the whole frame [H, W, 3]
    inputs: dict[str, Any] = field(default_factory=dict)
    # face input kind -> where its crops were cut (for previews and checks)
    sources: dict[str, CropSources] = field(default_factory=dict)
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    waiting: Waiting | None = None   # detect_on = "encoder": what `track_faces` makes the face inputs of

    def to_tensors(self) -> "Prepared":
        """The arrays as torch tensors (zero-copy), so a preparation process sends them through shared
        memory instead of pickling them."""
        import torch

        def t(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

        self.inputs = {k: t(v) for k, v in self.inputs.items()}
        if self.waiting is not None:
            self.waiting.look.frames, self.waiting.small = t(self.waiting.look.frames), t(self.waiting.small)
        return self

    def to_arrays(self) -> "Prepared":
        """Back to numpy (views of the shared memory, no copy)."""
        self.inputs = {k: v.numpy() for k, v in self.inputs.items()}
        if self.waiting is not None:
            self.waiting.look.frames, self.waiting.small = self.waiting.look.frames.numpy(), self.waiting.small.numpy()
        return self


@dataclass
class CropSources:
    """Where the crops of one face input were cut."""

    frames: list[int]     # the frame index of each crop
    boxes: np.ndarray     # [N, 4] the square cropped there, in frame pixels
    states: list[int]     # how that box was found: faces.DETECTED, INTERPOLATED, BORROWED or UNSEEN


@dataclass
class Waiting:
    """A decoded clip whose faces the encoding side tracks (detect_on = "encoder")."""

    look: Look                    # the planned frames, decoded, not tracked yet
    small: np.ndarray             # its anchor frames downscaled for MTCNN (faces.detection_frames) ...
    scale: tuple[float, float]    # ... and the factors (x, y) back to frame pixels
    info: decode.MediaInfo        # for decoding the frames of the main face's span (`span_plan`)


@dataclass(frozen=True)
class FramePlan:
    """Which frames of a clip were decoded and what each input is made of (`frame_plan`)."""

    n_frames: int          # the clip's frames
    wanted: list[int]      # the decoded frames' indices, sorted
    local: list[int]       # positions into `wanted` of the face frames
    temporal: list[int]    # ... of the face clip's 16 frames
    global_mode: str       # FrameSettings.global_frame
    span: tuple[int, int]  # the first and last frame the face frames and clip were sampled from

    @property
    def anchors(self) -> list[int]:
        """The positions the face track runs over: the face frames and the first frame of each temporal
        segment (a segment's next frame is cropped with its anchor's box)."""
        return sorted(set(self.local) | set(self.temporal[::TEMPORAL_PER_SEGMENT]))


def source_record(path: Path) -> dict:
    st = path.stat()
    rec = {"source": str(path), "size": st.st_size, "mtime": st.st_mtime}
    if path.is_file():
        rec["sha256"] = file_sha256(path)
    else:
        rec["size"] = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return rec


def frame_plan(n_total: int, fr: FrameSettings,
               span: tuple[int, int] | None = None) -> tuple[list[int], list[int], list[int]]:
    """Decoded frame indices (sorted, unique) and positions into them of the face frames and face clip,
    sampled over the whole clip, or over the frames ``span`` (first, last) of it: then without the
    global frame's own first / middle frame (it is the whole clip's)."""
    first, last = (0, n_total - 1) if span is None else span
    if not 0 <= first <= last < n_total:
        raise ValueError(f"frame_plan: span {span} is not inside the clip's {n_total} frames")
    local = [first + i for i in decode.uniform_indices(last - first + 1, fr.local_frames)]
    temporal = [first + i for i in decode.segment_pair_indices(last - first + 1, TEMPORAL_SEGMENTS,
                                                                TEMPORAL_PER_SEGMENT)]
    extra = [] if span is not None else [0] if fr.global_frame == "first" else \
        [max(0, (n_total - 1) // 2)] if fr.global_frame == "middle" else []
    wanted = sorted(set(local) | set(temporal) | set(extra))
    pos = {idx: i for i, idx in enumerate(wanted)}
    return wanted, [pos[i] for i in local], [pos[i] for i in temporal]


def plan_frames(n_total: int, fr: FrameSettings, span: tuple[int, int] | None = None) -> FramePlan:
    """`frame_plan` as a FramePlan."""
    wanted, local, temporal = frame_plan(n_total, fr, span)
    return FramePlan(n_total, wanted, local, temporal, fr.global_frame, span or (0, n_total - 1))


@dataclass
class Look:
    """A clip's frames of one plan, decoded, their shots, and (once tracked) the face track over its anchors."""

    plan: FramePlan
    frames: np.ndarray                      # [len(plan.wanted), H, W, 3]
    shots: np.ndarray                       # [len(plan.wanted)] each decoded frame's shot (faces.shot_ids)
    track: faces.FaceTrack | None = None    # over plan.anchors

    @classmethod
    def decode(cls, path: Path, plan: FramePlan, settings: StepSettings, info: decode.MediaInfo) -> "Look":
        frames = decode.read_frames(path, plan.wanted, max_side=settings.frames.max_side, info=info)
        return cls(plan, frames, faces.shot_ids(frames, settings.faces.cut_distance))

    def to_track(self) -> tuple[np.ndarray, list[int], np.ndarray]:
        """What `FaceDetector.track` takes for the anchors: frames, times (frame indices) and shots."""
        a = self.plan.anchors
        return self.frames[a], [self.plan.wanted[i] for i in a], self.shots[a]


def span_plan(look: Look, fr: FrameSettings) -> FramePlan | None:
    """The face inputs planned again inside the span where the look's main face is present (from its
    first to its last anchor frame detected or interpolated, all in its shot), when that is not the span
    of the anchors already; None when it is, or when there is no face."""
    if look.track is None or not look.track.found:
        return None
    present = np.flatnonzero(look.track.detected)
    anchors = look.plan.anchors
    if present[0] == 0 and present[-1] == len(anchors) - 1:
        return None
    span = (look.plan.wanted[anchors[present[0]]], look.plan.wanted[anchors[present[-1]]])
    return plan_frames(look.plan.n_frames, fr, span)


def prepare(job: ClipJob, settings: ExtractSettings, detector: faces.FaceDetector | None) -> Prepared:
    """Decode a clip and make its inputs. With a `detector`, the face inputs too; without one (faces
    tracked on the encoding side), the decoded frames wait in `Prepared.waiting` for `track_faces`."""
    prep = Prepared(job, {"id": job.id})
    t0 = time.perf_counter()
    try:
        path = Path(job.source)
        if not path.exists():
            raise decode.DecodeError(f"source not found: {path}")
        if not path.is_file() and not path.is_dir():
            raise decode.DecodeError("not a regular file or folder (a FIFO, socket or device cannot be a clip)")
        prep.record.update(source_record(path))
        info = decode.probe(path, folder_fps=settings.frames.folder_fps, max_pixels=settings.max_pixels)
        prep.record.update(duration=info.duration, frames=info.n_frames, fps=info.fps, width=info.width,
                           height=info.height, rotation=info.rotation, has_audio=info.has_audio)
        if note := info.frames_note():
            prep.record["frames_from"] = note
        if not info.has_video:
            raise decode.DecodeError("no video stream")
        if info.duration <= 0 or info.n_frames <= 0:
            raise decode.DecodeError("zero length")
        frames = job.wants_frames(settings)   # False: only the waveform (e.g. the text set of a stored clip)
        look = Look.decode(path, plan_frames(info.n_frames, settings.frames), settings, info) if frames else None
        audio = decode.read_audio(path, sample_rate=settings.sample_rate) if info.has_audio else np.zeros(0, np.float32)
        if audio.size == 0:
            policy = settings.missing_audio
            if policy == "fail" or (policy == "auto" and job.sound_expected()):
                why = "audio stream decodes to zero samples" if info.has_audio else "no audio stream"
                raise decode.DecodeError(f"{why} (the audio view needs one; --missing-audio silence encodes "
                                         "one second of silence instead)")
            audio = np.zeros(settings.sample_rate, np.float32)
            prep.record["audio"] = "silence: the clip has no audio"
        if path.is_file():
            st = path.stat()
            if st.st_size != prep.record["size"] or st.st_mtime != prep.record["mtime"]:
                raise decode.DecodeError("the file changed while it was read (still being written?): "
                                         "rerun once it is complete")
        prep.inputs[WAVEFORM] = audio
        t1 = time.perf_counter()
        prep.seconds["decode"] = t1 - t0
        if look is None:
            return prep
        if detector is None:   # downscaled for MTCNN here, where the cores are
            small, sx, sy = faces.detection_frames(look.frames[look.plan.anchors], settings.faces.detect_side)
            prep.waiting = Waiting(look, small, (sx, sy), info)
            return prep
        # MTCNN sees every faces.detect_every-th anchor frame; boxes between are interpolated in time
        # (their frame indices)
        look.track = detector.track(*look.to_track())
        views = None
        replan = span_plan(look, settings.frames)
        if replan is not None:   # the main face is not in every anchor frame: the face inputs from its span
            views = Look.decode(path, replan, settings, info)
            views.track = detector.track(*views.to_track())
        use_track(prep, look, views, settings.faces.crop_size)
        prep.seconds["faces"] = time.perf_counter() - t1
    except decode.DecodeError as e:
        prep.error = str(e)
    except Exception as e:  # noqa: BLE001 - one bad clip must never stop a run; the reason is kept
        log.debug("preparing %s failed", job.id, exc_info=True)
        prep.error = f"{type(e).__name__}: {e}"
    return prep


def use_track(prep: Prepared, first: Look, views: Look | None, crop_size: int) -> None:
    """The face inputs and the whole frame of a clip, and its record of faces and shots.

    ``first`` is the clip's planned frames, tracked; ``views`` the face inputs planned again inside the
    span of its main face (`span_plan`), tracked, or None when they were not (or its track found no
    face: then ``first`` gives them). The record counts the frames of ``first``: where the main face
    was detected, interpolated or absent over the whole clip, and its shots.

    A crop comes from a frame where the main face is (detected, interpolated, or borrowed from a frame
    of its shot). An anchor frame of another shot (UNSEEN: only where a cut turned up inside the span)
    takes the crop of the nearest anchor frame where it is; a segment's next frame is cropped with its
    anchor's box when both are in one shot, else takes its anchor's crop. A clip with no face at all
    uses the centre squares of its frames."""
    look = views if views is not None and views.track.found else first
    plan, track, per = look.plan, look.track, TEMPORAL_PER_SEGMENT
    anchors = plan.anchors
    frame_of = [plan.wanted[a] for a in anchors]
    usable = np.flatnonzero(track.state > faces.UNSEEN) if track.found else np.arange(len(anchors))
    # anchor position -> (crop, frame index, box, state): its own, or the nearest usable anchor's
    cut: dict[int, tuple[np.ndarray, int, np.ndarray, int]] = {}
    for k, a in enumerate(anchors):
        src = usable[np.argmin(np.abs(np.asarray(frame_of)[usable] - frame_of[k]))]
        cut[a] = (track.crops[src], frame_of[src], track.boxes[src], int(track.state[src]))
    for i, p in enumerate(plan.temporal):
        a = plan.temporal[i - i % per]
        if p not in cut:
            crop, f, box, state = cut[a]
            if f == plan.wanted[a] and (look.shots[p] == look.shots[a] or not track.found):
                crop, f = faces.crop(look.frames[p], box, crop_size), plan.wanted[p]
            cut[p] = (crop, f, box, state)
    if plan.global_mode == "peak":
        g, gframes, gplan = anchors[faces.peak_frame_index(track)], look.frames, plan
    else:   # the clip's own first / middle frame, which frame_plan put among the first look's frames
        gframes, gplan = first.frames, first.plan
        g = gplan.wanted.index(0 if plan.global_mode == "first" else max(0, (plan.n_frames - 1) // 2))
    for kind, positions in ((FACE_FRAMES, plan.local), (FACE_CLIP, plan.temporal)):
        prep.inputs[kind] = np.stack([cut[p][0] for p in positions])
        prep.sources[kind] = CropSources([cut[p][1] for p in positions], np.stack([cut[p][2] for p in positions]),
                                         [cut[p][3] for p in positions])
    prep.inputs[FRAME] = gframes[g]
    # the face's square in the whole frame: the box of the crop cut nearest to it (for [extract.perturb])
    near = min(cut.values(), key=lambda c: abs(c[1] - gplan.wanted[g]))
    prep.sources[FRAME] = CropSources([int(gplan.wanted[g])], near[2][None], [near[3]])
    counts = first.track.counts()
    prep.record.update(face_found=bool(first.track.found), face_frames=int(first.track.detected.sum()),
                       sampled_frames=len(first.plan.anchors), face_detected=counts["detected"],
                       face_interpolated=counts["interpolated"], face_absent=counts["absent"],
                       shots=int(first.shots.max()) + 1, face_span=list(plan.span),
                       global_index=int(gplan.wanted[g]))


def track_faces(prepared: Sequence[Prepared], detector: faces.FaceDetector, settings: StepSettings) -> None:
    """The face inputs of the prepared clips whose frames wait (detect_on = "encoder"): one batched
    `track_many` for all of them on the detector's device, then the frames of the main face's span
    decoded here (threaded) for the clips that need them (`span_plan`) and one more `track_many` for
    those. A clip that cannot be finished gets an error; if MTCNN itself fails, they all do."""
    todo = [p for p in prepared if p.error is None and p.waiting is not None]
    if not todo:
        return
    t = time.perf_counter()
    ws = [p.waiting for p in todo]
    views: list[Look | None] = [None] * len(todo)
    try:
        firsts = [w.look for w in ws]
        _track_looks(detector, firsts, [(w.small, *w.scale) for w in ws])

        def second(i: int) -> Look | None:
            replan = span_plan(firsts[i], settings.frames)
            if replan is None:
                return None
            try:
                return Look.decode(Path(todo[i].job.source), replan, settings, ws[i].info)
            except Exception as e:  # noqa: BLE001 - this clip fails with the reason; the group goes on
                todo[i].error = f"decoding the face span: {type(e).__name__}: {e}"
                return None

        views = detector.each(second, range(len(todo)))
        _track_looks(detector, [v for v in views if v is not None])
    except Exception as e:  # noqa: BLE001 - the group's clips fail with the reason; the run goes on
        log.debug("face detection failed", exc_info=True)
        for p in todo:
            p.error, p.waiting = f"face detection error: {type(e).__name__}: {e}", None
        return

    def finish(i: int) -> None:
        p = todo[i]
        try:
            if p.error is None:
                use_track(p, ws[i].look, views[i], detector.settings.crop_size)
        except Exception as e:  # noqa: BLE001 - one bad clip must never stop a run; the reason is kept
            p.error = f"face detection error: {type(e).__name__}: {e}"
        p.waiting = None

    detector.each(finish, range(len(todo)))
    share = (time.perf_counter() - t) / len(todo)
    for p in todo:
        p.seconds["faces"] = p.seconds.get("faces", 0.0) + share


def _track_looks(detector: faces.FaceDetector, looks: Sequence[Look], smalls: Sequence[faces.Small] | None = None) -> None:
    """Track the anchors of several looks in one batched MTCNN pass (`FaceDetector.track_many`)."""
    if not looks:
        return
    frames, times, shots = zip(*(look.to_track() for look in looks))
    for look, track in zip(looks, detector.track_many(list(frames), list(times), smalls=smalls, shots=list(shots))):
        look.track = track


_PREP_DETECTORS: dict[faces.FaceSettings, faces.FaceDetector] = {}


def prepare_in_process(job: ClipJob, settings: ExtractSettings) -> Prepared:
    """`prepare` in a preparation process: MTCNN on the CPU (forked workers never touch CUDA), one
    detector per process (a forked worker inherits the parent's when that one is on the CPU); none when
    the encoding side tracks the faces (detect_on = "encoder")."""
    det = _PREP_DETECTORS.get(settings.faces)
    if detect_on(settings) == "encoder":
        det = None
    elif det is None:
        loaded = _MODELS.get(settings)
        det = loaded.detector if loaded is not None and loaded.detector.device == "cpu" else \
            faces.FaceDetector(settings.faces, device="cpu")
        _PREP_DETECTORS.clear()
        _PREP_DETECTORS[settings.faces] = det
    return prepare(job, settings, det).to_tensors()


def _init_prep_process(worker_id: int) -> None:
    """A preparation process decodes on one thread, like its torch (P processes share the cores)."""
    decode.set_decoder_threads(1)


def _prepare_here(job: ClipJob, ctx: tuple[ExtractSettings, faces.FaceDetector | None]) -> Prepared:
    return prepare(job, ctx[0], ctx[1])


def prep_processes(settings: StepSettings) -> int:
    """The preparation processes of this encoding worker (0: a thread)."""
    n = prep.default_workers() if settings.prep_workers is None else settings.prep_workers
    return prep.usable_workers(n)


def face_group(settings: StepSettings) -> int:
    """The clips taken from the stream at a time: a micro-batch, or with detect_on = encoder the
    micro-batches whose faces are found together (at least FACE_GROUP clips)."""
    mb = max(1, settings.micro_batch)
    return mb * -(-FACE_GROUP // mb) if detect_on(settings) == "encoder" else mb


def prepared_clips(jobs: Sequence[ClipJob], settings: ExtractSettings, m: Models,
                   n: int | None = None) -> Iterator[Prepared]:
    """Each job prepared, in order: by `n` processes (default `prep_processes(settings)`), or one thread
    (0). The processes may read up to two groups (`face_group`) ahead, so the next one is ready when
    encoding ends."""
    ahead = 2 * face_group(settings)
    n = prep_processes(settings) if n is None else n
    if n == 0:
        det = m.detector if detect_on(settings) == "prep" else None
        yield from prep.thread_map(_prepare_here, (settings, det), jobs, ahead)
        return
    key = (settings, n)
    pool = prep.pool_for(key, prepare_in_process, settings, n, ahead=-(-ahead // n), init=_init_prep_process)
    try:
        for p in pool.map(jobs):
            yield p.to_arrays()
    except Exception:
        prep.drop_pool(key)   # a worker died (or the pool broke): the next task starts a fresh pool
        raise


# ---------------------------------------------------------------------------------------------
# The GPU half: encode a micro-batch of prepared clips


def encode(prepared: Sequence[Prepared], m: Models, seconds: dict[str, float]) -> list[dict[str, np.ndarray]]:
    """Every encoder on the input kind it declares, for the clips of a micro-batch that want it (`ClipJob.views`)."""
    rows: list[dict[str, np.ndarray]] = [{} for _ in prepared]
    if m.perturb is not None:
        t = time.perf_counter()
        for p in prepared:
            box = p.sources[FRAME].boxes[0] if FRAME in p.sources else None
            p.inputs = perturb.apply(p.inputs, m.perturb, perturb.clip_seed(p.record), box)
        seconds["perturb"] = seconds.get("perturb", 0.0) + time.perf_counter() - t
    for view, enc in m.encoders.items():
        mine = [i for i, p in enumerate(prepared) if p.job.wants(view)]
        if not mine:
            continue
        t = time.perf_counter()
        with torch_threads(m.threads):
            outs = enc.encode([prepared[i].inputs[enc.input_kind] for i in mine])
        seconds[view] = seconds.get(view, 0.0) + time.perf_counter() - t
        for row, out in zip([rows[i] for i in mine], outs):
            for name, arr in out.items():
                row[f"{view}.{enc.name}.{name}"] = arr
    return rows


def _chunks(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def run_batch(jobs: Sequence[ClipJob], settings: ExtractSettings, store_url: str, keys: dict[str, str], *,
              storage_options: dict | None = None, preview_dir: str | None = None,
              writer_id: str | None = None) -> BatchResult:
    """Extract `jobs` and commit them (features or failures) to the store as one segment.

    `keys` maps output names ("audio.hubert.frames") to the store's feature-set keys.

    A job with `replace` (its source changed since its features were made) keeps its earlier features
    until the new ones are committed: they are superseded in the same commit, never removed first. If
    it fails, nothing of it is written: the earlier features and record stay, and a rerun tries again.
    A preview that cannot be written is reported in `preview_failed`; it never fails its clip."""
    [(_, result, error)] = list(run_batches([jobs], settings, store_url, keys, storage_options=storage_options,
                                            preview_dir=preview_dir, writer_id=writer_id))
    if error is not None:
        raise error
    return result


def run_batches(tasks: Sequence[Sequence[ClipJob]], settings: ExtractSettings, store_url: str, keys: dict[str, str],
                *, storage_options: dict | None = None, preview_dir: str | None = None, writer_id: str | None = None,
                ) -> Iterator[tuple[list[ClipJob], BatchResult | None, BaseException | None]]:
    """`run_batch` of each task in turn, in this process, yielding (jobs, result, error) per task.

    The tasks share one preparation stream: the preparation processes go on with the next task's clips
    while this one's last micro-batch is encoded and committed. A task that raises is reported with its
    error (nothing of it committed) and the stream restarts at the next task."""
    tasks = [list(t) for t in tasks]
    settings = resolved(settings)   # the pipeline sends them resolved; a library caller may not
    m = models(settings)
    store = FeatureStore.open(store_url, storage_options=storage_options)
    n = prep_processes(settings)
    i = 0
    while i < len(tasks):
        stream = prepared_clips([j for t in tasks[i:] for j in t], settings, m, n)
        try:
            while i < len(tasks):
                jobs, i = tasks[i], i + 1
                try:
                    result = _run_task(jobs, stream, m, store, keys, settings, preview_dir, writer_id)
                    result.prep_workers = n
                except Exception as e:  # noqa: BLE001 - the caller records the task as failed
                    log.debug("task failed", exc_info=True)
                    yield jobs, None, e
                    break   # the stream may be mid-task or broken: a fresh one for the tasks left
                yield jobs, result, None
        finally:
            stream.close()   # stops the preparation thread (a pool of processes resets at its next pass)


def _run_task(jobs: list[ClipJob], stream: Iterator[Prepared], m: Models, store: FeatureStore, keys: dict[str, str],
              settings: ExtractSettings, preview_dir: str | None, writer_id: str | None) -> BatchResult:
    result = BatchResult()
    with store.writer(writer_id) as writer:
        _encode_groups(jobs, stream, settings, m, keys, writer, result, preview_dir)
        t = time.perf_counter()
        writer.commit()
        result.seconds["write"] = result.seconds.get("write", 0.0) + time.perf_counter() - t
    return result


def _encode_groups(jobs: Sequence[ClipJob], stream: Iterator[Prepared], settings: ExtractSettings, m: Models,
                   keys: dict[str, str], writer, result: BatchResult, preview_dir: str | None) -> None:
    """Track faces (detect_on = "encoder": for `face_group` clips at once), encode micro-batch by
    micro-batch, then add to the writer, the prepared clips of `stream` (the groups are the jobs cut in
    order, so the batches, hence the values, are the same for any P)."""
    sec = result.seconds
    for group in _chunks(list(jobs), face_group(settings)):
        t = time.perf_counter()
        prepared = [next(stream) for _ in group]
        sec["wait"] = sec.get("wait", 0.0) + time.perf_counter() - t   # the encoding side idle
        with torch_threads(m.threads):
            track_faces(prepared, m.detector, settings)
        for micro in _chunks(prepared, max(1, settings.micro_batch)):
            _encode_micro(micro, m, keys, writer, result, preview_dir)


def _encode_micro(prepared: Sequence[Prepared], m: Models, keys: dict[str, str], writer, result: BatchResult,
                  preview_dir: str | None) -> None:
    """Encode one micro-batch of prepared clips and add them (or their failures) to the writer."""
    sec = result.seconds
    good = []
    for p in prepared:
        for stage, s in p.seconds.items():
            sec[stage] = sec.get(stage, 0.0) + s
        if p.error:
            _fail(writer, result, p, p.error)
        else:
            good.append(p)
    if not good:
        return
    try:
        rows = encode(good, m, sec)
    except Exception as e:  # noqa: BLE001 - record the whole micro-batch as failed, go on
        log.debug("encoding failed", exc_info=True)
        for p in good:
            _fail(writer, result, p, f"encoder error: {type(e).__name__}: {e}")
        return
    from emollama.store.interop import non_finite

    t = time.perf_counter()
    for p, row in zip(good, rows):
        feats = {keys[name]: arr for name, arr in row.items() if name in keys}
        # every array finite as it will be stored (NaN, Inf, or beyond float16's range fail the clip)
        bad = [f"{name}: {why}" for name, arr in row.items() if name in keys
               and (why := non_finite(arr, writer.store.spec(keys[name]).dtype))]
        if bad:
            _fail(writer, result, p, f"non-finite encoder output in {'; '.join(bad)}")
            continue
        # replace: this commit's own mark supersedes the earlier copies (nothing is removed first)
        writer.add(p.job.id, feats, {**p.record, "status": "ok"}, replace=p.job.replace)
        result.ok.append(p.job.id)
        if p.record.get("face_found") is False:
            result.no_face.append(p.job.id)
    sec["write"] = sec.get("write", 0.0) + time.perf_counter() - t
    if preview_dir:
        t = time.perf_counter()
        for p in (p for p in good if FACE_FRAMES in p.inputs):   # not for a clip given its waveform only
            try:
                write_preview(Path(preview_dir), p)
            except Exception as e:  # noqa: BLE001 - a side output never fails the clip it describes
                log.warning("preview of %s not written: %s: %s", p.job.id, type(e).__name__, e)
                result.preview_failed.append((p.job.id, f"{type(e).__name__}: {e}"))
        sec["preview"] = sec.get("preview", 0.0) + time.perf_counter() - t


def _fail(writer, result: BatchResult, p: Prepared, reason: str) -> None:
    """Record a clip's failure; a replacement's failure is reported only, so its earlier features and
    record stay in the store (and a rerun, still seeing the changed source, tries again)."""
    if p.job.replace:
        result.failed.append((p.job.id, f"{reason} (its features from the earlier version of the file are kept)"))
        result.kept.append(p.job.id)
        return
    writer.fail(p.job.id, reason, {**p.record, "status": "failed", "reason": reason})
    result.failed.append((p.job.id, reason))


STATE_MARK = {faces.DETECTED: "d", faces.INTERPOLATED: "i", faces.BORROWED: "b", faces.UNSEEN: "-"}


def face_summary(record: Mapping[str, Any]) -> str:
    """One line on a clip's faces from its record (`use_track`)."""
    if not record.get("face_found"):
        return "NO FACE: centre squares of the whole frames"
    d, i, a = (int(record.get(k, 0)) for k in ("face_detected", "face_interpolated", "face_absent"))
    weak = "WEAK TRACK: " if faces.is_weak(d, i, a) else ""
    first, last = record.get("face_span", (0, record.get("frames", 1) - 1))
    return (f"{weak}main face detected {d}, interpolated {i}, absent {a} of {d + i + a} anchor frames; "
            f"{record.get('shots', 1)} shot(s); face views from frames {first}-{last}")


def write_preview(folder: Path, prep: Prepared, *, thumb: int = 112) -> Path:
    """A contact sheet for a person to check: a line on the faces, the crops each face input was given
    (local, then temporal), each marked with the frame it was cut from and how its box was found (d
    detected, i interpolated, b borrowed from the shot, - no face: the centre square), then the global frame."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    cols, line = 8, 16
    blocks = [(kind, prep.inputs[kind], prep.sources.get(kind)) for kind in (FACE_FRAMES, FACE_CLIP)]
    rows = [-(-len(crops) // cols) for _, crops, _ in blocks]
    frame = Image.fromarray(prep.inputs[FRAME])
    frame = frame.resize((cols * thumb, max(1, int(frame.height * cols * thumb / frame.width))))
    height = line + sum(line + r * thumb for r in rows) + line + frame.height
    sheet = Image.new("RGB", (cols * thumb, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"{prep.job.id}  {face_summary(prep.record)}", fill="black")
    y = line
    for (kind, crops, src), r in zip(blocks, rows):
        draw.text((4, y + 2), f"{kind}: {len(crops)} crops", fill="black")
        y += line
        for i, c in enumerate(crops):
            x0, y0 = (i % cols) * thumb, y + (i // cols) * thumb
            sheet.paste(Image.fromarray(np.asarray(c)).resize((thumb, thumb)), (x0, y0))
            if src is not None:
                mark = f"#{src.frames[i]} {STATE_MARK[src.states[i]]}"
                draw.rectangle((x0, y0, x0 + 7 * len(mark) + 4, y0 + 12), fill="black")
                draw.text((x0 + 2, y0), mark, fill="white")
        y += r * thumb
    draw.text((4, y + 2), f"global frame #{prep.record.get('global_index')}", fill="black")
    sheet.paste(frame, (0, y + line))
    out = folder / preview_name(prep.job.id)
    sheet.save(out, format="PNG")
    return out


def preview_name(clip_id: str) -> str:
    """A contact sheet's file name: the id made safe for any file system (at most 80 characters, no
    leading dot) plus a hash of the exact id, so ids that read the same ("a b" and "a_b", "." and "..")
    never share a file."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in clip_id)[:80].lstrip(".") or "clip"
    return f"{safe}-{hashlib.sha256(clip_id.encode()).hexdigest()[:8]}.png"


def default_writer_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"

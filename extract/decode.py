"""Decoding video files and frame folders with PyAV (no system ffmpeg).

A *source* is either a video file or a folder of JPEG/PNG frames (read in natural
name order, at ``folder_fps``). Frame indices are positions on the clip's nominal
frame grid: index ``k`` is the frame shown at time ``k / fps`` after the first frame,
found from the decoded frames' timestamps, so variable frame rate clips sample
evenly in time (indices past the real end clamp to the last frame).

A clip's duration and frame count are the video stream's own, never the container's:
a container's duration is its longest stream's, so an hour of audio beside 5 s of
video would spread every sampled frame past the video's end. The stream's frame
count from the header is used where the container keeps one (MP4/MOV sample tables,
AVI); elsewhere (Matroska, WebM, MPEG-TS, ...) the video packets are counted, a
demuxing pass that decodes nothing. Counting also finds where the timestamps
restart (two transport streams joined with ``cat``): each such part adds its own
span, and ``read_frames`` lays the parts end to end on one clock.

Frames come back upright (display-matrix rotation applied) as RGB uint8.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
LONG_CLIP_SECONDS = 120.0  # longer clips are read by seeking to each target
DEFAULT_MAX_PIXELS = 8192 * 8192  # a decoded frame larger than this fails the clip (extract.max_pixels)
SEEK_GAP_SECONDS = 5.0  # in seek mode, decode forward instead of seeking when the next target is this close
# In a format that allows timestamp discontinuities (MPEG-TS, MPEG-PS), a forward jump of the video
# timestamps larger than this starts a new part, as FFmpeg's own dts_delta_threshold does; a jump
# backwards starts one in any format.
DISCONTINUITY_SECONDS = 10.0

# Decoder and RGB-conversion threads: 0 lets FFmpeg use every core (one decoding process); a
# preparation process (extract.prep) decodes on one, since P of them share the cores. The frames are
# the same either way (tests/pipeline/test_scale_cluster.py compares stores).
_DECODER_THREADS = 0


def set_decoder_threads(n: int) -> None:
    """Threads of each video decoder opened in this process from now on (0: FFmpeg's choice)."""
    global _DECODER_THREADS
    _DECODER_THREADS = max(0, int(n))


def _threading(vs) -> None:
    if _DECODER_THREADS == 1:
        vs.codec_context.thread_count = 1
        return
    vs.thread_type = "AUTO"
    if _DECODER_THREADS > 1:
        vs.codec_context.thread_count = _DECODER_THREADS


class DecodeError(Exception):
    """A clip cannot be decoded; ``str(e)`` is a short human-readable reason."""


@dataclass
class MediaInfo:
    path: str
    duration: float  # seconds
    fps: float | None  # average frame rate (folder: folder_fps)
    n_frames: int  # the video stream's frame count: from its header, else its packets counted
    width: int  # as displayed (after rotation)
    height: int
    rotation: int  # degrees counter-clockwise applied for display: 0, 90, 180 or 270
    has_video: bool
    has_audio: bool
    audio_rate: int | None
    frames_from: str = "header"  # where n_frames came from: header | packets (counted) | folder
    parts: int = 1  # runs of continuous video timestamps (2: two transport streams joined end to end)

    def frames_note(self) -> str | None:
        """Where the frame count came from, for the clip's record (None: the stream's header)."""
        if self.frames_from != "packets":
            return None
        if self.parts > 1:
            return f"packets ({self.parts} parts joined end to end, each restarting its timestamps)"
        return "packets (the video stream's header gives no frame count)"


# ---------------------------------------------------------------- index helpers


def uniform_indices(n_total: int, n: int) -> list[int]:
    """``n`` indices spread over ``[0, n_total)``: the centres of ``n`` equal bins.

    Repeats appear when ``n_total < n``.
    """
    if n_total <= 0:
        raise ValueError(f"uniform_indices: n_total must be positive, got {n_total}")
    if n <= 0:
        return []
    return [min(n_total - 1, int((i + 0.5) * n_total / n)) for i in range(n)]


def segment_pair_indices(n_total: int, n_segments: int = 8, per_segment: int = 2) -> list[int]:
    """VideoMAE test-time sampling: the middle frame of each of ``n_segments`` equal
    segments followed by the next ``per_segment - 1`` consecutive frames
    (``n_segments * per_segment`` indices, clamped to the clip)."""
    if n_total <= 0:
        raise ValueError(f"segment_pair_indices: n_total must be positive, got {n_total}")
    out: list[int] = []
    for mid in uniform_indices(n_total, n_segments):
        start = min(mid, max(0, n_total - per_segment))  # keep the run inside the clip when possible
        out.extend(min(n_total - 1, start + j) for j in range(per_segment))
    return out


# ---------------------------------------------------------------- frame folders


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, in natural name order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises many types
        raise DecodeError(f"cannot read frame {path.name}: {e}") from e
    return img.convert("RGB")


def _first_readable(files: list[Path], i: int) -> Image.Image:
    """Frame i, or the nearest readable frame when i is corrupt (a warning says so)."""
    try:
        return _open_image(files[i])
    except DecodeError as first:
        for d in range(1, len(files)):
            for j in (i - d, i + d):
                if 0 <= j < len(files):
                    try:
                        img = _open_image(files[j])
                    except DecodeError:
                        continue
                    log.warning("%s: %s; using %s instead", files[i].parent, first, files[j].name)
                    return img
        raise DecodeError(f"no readable frame in {files[i].parent} ({first})") from first


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse a frame size whose decoding would need more than ``max_pixels`` pixels (None/0: no limit).

    Checked from the header, before anything is decoded: a tiny file can declare a huge frame."""
    if max_pixels and width * height > max_pixels:
        raise DecodeError(f"frame size {width}x{height} ({width * height:,} pixels) exceeds the limit of "
                          f"{max_pixels:,} pixels (extract.max_pixels)")


def _probe_folder(folder: Path, folder_fps: float, max_pixels: int | None = None) -> MediaInfo:
    files = list_frame_files(folder)
    if not files:
        raise DecodeError(f"no video stream: folder has no {'/'.join(IMAGE_SUFFIXES)} frames")
    if max_pixels:
        try:
            with Image.open(files[0]) as head:   # reads the header only
                check_pixels(head.width, head.height, max_pixels)
        except DecodeError:
            raise
        except Exception:  # noqa: BLE001 - an unreadable first frame is handled below
            pass
    img = _first_readable(files, 0)
    check_pixels(img.width, img.height, max_pixels)
    return MediaInfo(
        path=str(folder), duration=len(files) / folder_fps, fps=folder_fps, n_frames=len(files),
        width=img.width, height=img.height, rotation=0, has_video=True, has_audio=False, audio_rate=None,
        frames_from="folder",
    )


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _read_folder(folder: Path, indices: Sequence[int], max_side: int | None) -> np.ndarray:
    files = list_frame_files(folder)
    if not files:
        raise DecodeError("no video stream: folder has no image frames")
    cache: dict[int, np.ndarray] = {}
    size: tuple[int, int] | None = None
    for k in sorted(set(indices)):
        i = min(max(int(k), 0), len(files) - 1)
        if i in cache:
            continue
        img = _first_readable(files, i)
        if size is None:
            size = _scaled_size(img.width, img.height, max_side)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        cache[i] = np.asarray(img, dtype=np.uint8)
    out = [cache[min(max(int(k), 0), len(files) - 1)] for k in indices]
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


# ---------------------------------------------------------------- video files


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise DecodeError(f"cannot open: file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise DecodeError("zero length: empty file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DecodeError(f"cannot open: {e}") from e


def _norm_rotation(deg: float | int | None) -> int:
    if not deg:
        return 0
    return int(round(float(deg) / 90.0)) % 4 * 90


def _frames(container, stream) -> Iterator[av.VideoFrame]:
    """Decoded frames; a decoding error after at least one good frame ends the stream."""
    n = 0
    try:
        for frame in container.decode(stream):
            n += 1
            yield frame
    except av.FFmpegError as e:
        if n == 0:
            raise DecodeError(f"cannot decode video: {e}") from e
        log.warning("video decoding stopped early after %d frames: %s", n, e)


@dataclass
class PacketCount:
    """The first video stream's packets, counted by `count_packets`."""

    frames: int
    seconds: float  # the span of their timestamps, summed over the parts
    parts: int  # runs of continuous timestamps


def count_packets(path: Path) -> PacketCount:
    """Frames of the first video stream counted from its packets (a demuxing pass: nothing is decoded),
    and the time they span. For containers whose header holds no frame count of the video stream
    (Matroska/WebM, MPEG-TS, streaming recordings), or whose duration is another stream's.

    Where the decoding timestamps go back (or, in MPEG-TS/PS, jump forward by more than
    ``DISCONTINUITY_SECONDS``) a new part begins: files joined with ``cat`` are counted whole, and
    the span is the sum of the parts' spans.

    Raises DecodeError when the container ends in the middle of a record: the file is truncated, or
    still being written, and must not be stored as a complete clip."""
    import av.logging as avlog

    container = _open(path)
    previous = avlog.get_level()
    try:
        vs = container.streams.video[0]
        tb = float(vs.time_base) if vs.time_base else 0.0
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        step = round(1 / (float(rate) * tb)) if rate and tb else 0   # one frame, in time_base units
        jumps = bool(container.format.flags & av.format.Flags.ts_discont.value)
        n, parts, seconds = 0, 0, 0.0
        lo = hi = last_dur = last_dts = None

        def close_part() -> float:
            if lo is None or hi is None:
                return 0.0
            return (hi - lo + (last_dur or step)) * tb

        # libav reports a record cut short only in its log ("File ended prematurely"): listen to it
        if previous is None or previous < avlog.ERROR:
            avlog.set_level(avlog.ERROR)
        with avlog.Capture(True) as logs:
            try:
                for pkt in container.demux(vs):
                    if not pkt.size:
                        continue
                    n += 1
                    dts = pkt.dts
                    if dts is not None and last_dts is not None and (
                            dts < last_dts or (jumps and (dts - last_dts) * tb > DISCONTINUITY_SECONDS)):
                        seconds += close_part()   # the timestamps restart: a new part
                        lo = hi = last_dur = None
                        parts += 1
                    if dts is not None:
                        last_dts = dts
                    if pkt.pts is not None:
                        lo = pkt.pts if lo is None else min(lo, pkt.pts)
                        if hi is None or pkt.pts >= hi:
                            hi, last_dur = pkt.pts, pkt.duration or 0
            except av.FFmpegError as e:
                raise DecodeError(f"incomplete file: demuxing stopped after {n} frames ({e}); "
                                  "truncated, or still being written: rerun once it is complete") from e
        cut = [msg.strip() for level, _name, msg in logs
               if level <= avlog.ERROR and ("prematurely" in msg or "truncat" in msg.lower())]
        if cut:
            raise DecodeError(f"incomplete file: the container ends in the middle of a record after {n} frames "
                              f"({cut[0]}); truncated, or still being written: rerun once it is complete")
        return PacketCount(n, float(seconds + close_part()), parts + 1 if n else 0)
    finally:
        avlog.set_level(previous)
        container.close()


def probe(source: str | Path, *, folder_fps: float = 25.0, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> MediaInfo:
    """Duration, frame rate, size, rotation and streams of a video file or frame folder.

    Decodes the first video frame (to read rotation and to prove the clip decodes), after checking
    the declared frame size against ``max_pixels``. The duration and frame count are the video
    stream's: its header's frame count where it has one (then its duration, else count / fps),
    else its packets counted (`count_packets`); never the container's duration, which may be
    the audio's.
    A file with audio but no video is returned with ``has_video=False``;
    ``read_frames`` on it raises ``DecodeError("no video stream")``.
    """
    path = Path(source)
    if path.is_dir():
        return _probe_folder(path, folder_fps, max_pixels)
    container = _open(path)
    try:
        vs = container.streams.video[0] if container.streams.video else None
        as_ = container.streams.audio[0] if container.streams.audio else None
        if vs is None and as_ is None:
            raise DecodeError("no video stream (and no audio stream)")
        container_dur = container.duration / 1e6 if container.duration else 0.0
        audio_rate = int(as_.rate) if as_ is not None and as_.rate else None
        if vs is None:
            return MediaInfo(str(path), container_dur, None, 0, 0, 0, 0, False, True, audio_rate)
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        fps = float(rate) if rate else None
        cc = vs.codec_context
        check_pixels(int(cc.width or 0), int(cc.height or 0), max_pixels)
        _threading(vs)
        first = next(_frames(container, vs), None)
        if first is None:
            raise DecodeError("zero length: no decodable video frames")
        check_pixels(first.width, first.height, max_pixels)
        rotation = _norm_rotation(first.rotation)
        w, h = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        n_frames = int(vs.frames or 0)   # the stream's own count (MP4/MOV sample tables, AVI)
        dur = float(vs.duration * vs.time_base) if n_frames > 0 and vs.duration and vs.time_base else 0.0
        info = MediaInfo(str(path), dur, fps, n_frames, w, h, rotation, True, as_ is not None, audio_rate)
    finally:
        container.close()   # first: no decoder thread alive while count_packets listens to the log
    if n_frames <= 0:
        # no frame count of the video stream: count its packets, never trust the container's duration
        # (the longest stream's: an mkv's audio may outlast its video by an hour)
        count = count_packets(path)
        if count.frames <= 0:
            raise DecodeError("zero length: no video packets")
        info.n_frames, info.duration, info.parts, info.frames_from = count.frames, count.seconds, count.parts, "packets"
        if not info.fps and count.seconds > 0:
            info.fps = count.frames / count.seconds
    if info.duration <= 0:
        info.duration = info.n_frames / info.fps if info.fps else 0.0
    return info


class _Picker:
    """Maps sorted target times to the nearest decoded frame, converting each kept frame once."""

    def __init__(self, targets: list[float], max_side: int | None, rotation: int):
        self.targets = targets  # sorted unique target times (relative to the first frame)
        self.next = 0  # first target not yet assigned
        self.max_side = max_side
        self.rotation = rotation
        self.size: tuple[int, int] | None = None
        self.got: dict[int, np.ndarray] = {}  # target position -> image

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None:
            self.size = _scaled_size(frame.width, frame.height, self.max_side)
        w, h = self.size
        img = frame.to_ndarray(format="rgb24", width=w, height=h, threads=_DECODER_THREADS)
        if self.rotation:
            img = np.ascontiguousarray(np.rot90(img, k=self.rotation // 90))
        return img

    def done(self) -> bool:
        return self.next >= len(self.targets)

    def offer(self, prev: av.VideoFrame | None, prev_t: float, frame_t: float) -> None:
        """Assign to ``prev`` every pending target nearer to prev_t than to frame_t."""
        if prev is None:
            return
        img = None
        mid = (prev_t + frame_t) / 2
        while self.next < len(self.targets) and self.targets[self.next] < mid:
            img = self._convert(prev) if img is None else img
            self.got[self.next] = img
            self.next += 1

    def finish(self, last: av.VideoFrame | None) -> None:
        if last is None or self.done():
            return
        img = self._convert(last)
        while self.next < len(self.targets):
            self.got[self.next] = img
            self.next += 1


def _frame_time(frame: av.VideoFrame, fallback: float) -> float:
    t = frame.time
    return float(t) if t is not None else fallback


class _Clock:
    """A decoded frame's time after the first frame. In a clip of joined parts (``MediaInfo.parts``
    > 1) a frame whose timestamp goes back, or jumps ahead by more than ``DISCONTINUITY_SECONDS``,
    starts the next part one frame after the previous one: the parts play end to end."""

    def __init__(self, fps: float, joined: bool):
        self.step, self.joined, self.offset = 1 / fps, joined, 0.0

    def time(self, frame: av.VideoFrame, t0: float, prev_t: float) -> float:
        t = _frame_time(frame, t0 + prev_t - self.offset + self.step) - t0 + self.offset
        if self.joined and (t < prev_t or t - prev_t > DISCONTINUITY_SECONDS):
            self.offset += prev_t + self.step - t
            t = prev_t + self.step
        return t


def read_frames(
    source: str | Path,
    indices: Sequence[int],
    *,
    max_side: int | None = 1280,
    info: MediaInfo | None = None,
) -> np.ndarray:
    """Frames at ``indices`` as ``[len(indices), H, W, 3]`` uint8 RGB, in the order given.

    One sequential decoding pass keeps only the wanted frames (clips longer than
    120 s seek to each target instead). Index ``k`` is the frame nearest to time
    ``k / fps``; indices past the real end give the last frame. Rotation metadata
    is applied; frames whose longest side exceeds ``max_side`` are downscaled.
    """
    path = Path(source)
    if path.is_dir():
        return _read_folder(path, indices, max_side)
    if any(int(k) < 0 for k in indices):
        raise ValueError(f"read_frames: negative frame index in {list(indices)[:8]}")
    info = info or probe(path)
    if not info.has_video:
        raise DecodeError("no video stream")
    if len(indices) == 0:
        return np.zeros((0, 0, 0, 3), np.uint8)
    fps = info.fps or 25.0
    uniq = sorted(set(int(k) for k in indices))
    targets = [k / fps for k in uniq]
    picker = _Picker(targets, max_side, info.rotation)

    container = _open(path)
    try:
        vs = container.streams.video[0]
        _threading(vs)
        # joined parts restart their timestamps: one sequential pass lays them end to end on one clock
        seek_mode = info.duration > LONG_CLIP_SECONDS and info.parts == 1
        clock = _Clock(fps, joined=info.parts > 1)
        frames = _frames(container, vs)
        first = next(frames, None)
        if first is None:
            raise DecodeError("zero length: no decodable video frames")
        t0 = _frame_time(first, 0.0)
        prev, prev_t, last = first, 0.0, first
        seeked_for = -1  # the target of the last seek: never seek twice for one target
        while not picker.done():
            nxt = picker.next
            if seek_mode and nxt != seeked_for and picker.targets[nxt] - prev_t > SEEK_GAP_SECONDS:
                seeked_for = nxt
                try:
                    container.seek(int((t0 + picker.targets[nxt]) / vs.time_base), stream=vs,
                                   backward=True, any_frame=False)
                except av.FFmpegError as e:
                    log.warning("seek failed (%s); decoding sequentially", e)
                    seek_mode = False
                else:
                    frames = _frames(container, vs)
                    prev = None
            frame = next(frames, None)
            if frame is None:
                break
            last = frame
            t = clock.time(frame, t0, prev_t)
            if prev is None:  # just seeked: targets before this frame (keyframe landed late) take it
                while not picker.done() and picker.targets[picker.next] < t:
                    picker.got[picker.next] = picker._convert(frame)
                    picker.next += 1
            else:
                picker.offer(prev, prev_t, t)
            prev, prev_t = frame, t
        picker.finish(prev if prev is not None else last)
    except av.FFmpegError as e:
        raise DecodeError(f"cannot decode video: {e}") from e
    finally:
        container.close()
    by_index = {k: picker.got[i] for i, k in enumerate(uniq)}
    return np.stack([by_index[int(k)] for k in indices])


def read_audio(source: str | Path, *, sample_rate: int = 16000) -> np.ndarray:
    """The first audio stream as float32 mono in [-1, 1] at ``sample_rate``.

    Decoded and resampled chunk by chunk (PyAV's AudioResampler). Returns an empty
    array when there is no audio stream (frame folders included).
    """
    path = Path(source)
    if path.is_dir():
        return np.zeros(0, np.float32)
    container = _open(path)
    chunks: list[np.ndarray] = []
    try:
        if not container.streams.audio:
            return np.zeros(0, np.float32)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler ignore timestamp gaps
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            if not chunks:
                raise DecodeError(f"cannot decode audio: {e}") from e
            log.warning("audio decoding stopped early: %s", e)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    finally:
        container.close()
    if not chunks:
        return np.zeros(0, np.float32)
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    return np.clip(audio, -1.0, 1.0, out=audio)

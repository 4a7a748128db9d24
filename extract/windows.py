"""A long video as windows: its shot cuts, a plan of windows over it, and each window written out as a
clip of its own, all from streamed decoding (memory bounded for any length).

- ``scan_cuts``: one decoding pass, frames sampled at ``scan_fps``; a cut where two samples' colour
  histograms differ by more than ``cut_distance`` (the face tracker's measure, ``faces.colour_histogram``),
  placed at the later sample (so within 1 / scan_fps of the real cut).
- ``plan_windows``: windows of ``window`` seconds every ``hop`` seconds inside each shot (a window never
  crosses a cut when cuts are given); the last window of a shot ends at the shot's end.
- ``write_windows``: a second pass; each window becomes a Matroska file (FFV1 video at the source's frame
  rate, at most ``max_side`` pixels; 16 kHz mono PCM audio: both lossless), written while the video plays
  and handed out as soon as it is complete. At most ceil(window / hop) + 1 windows are open at once.
  FFV1, not H.264: x264 gave a window other bytes from run to run (its decisions vary; measured on a
  video joined from the sample clips: 1 to 8 of 11 windows differed between runs), and a window is found
  again by its bytes. FFV1 is exact, at about 4 MB a 3 s window of 480x270.

The window files are clips like any other: ``pipeline.timeline`` sends them through a run's predictor, whose
store finds a window it has seen before by its content (the encoding is lossless and deterministic, and
the file holds no date or random id: ``bitexact``), so a rerun extracts nothing. Rotation metadata is not carried over: a rotated phone clip's windows are stored as decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np

from emollama.extract.decode import DecodeError
from emollama.extract.faces import colour_histogram

AUDIO_RATE = 16000
MIN_SHOT_S = 0.5     # a shot shorter than this gets no window of its own (it is listed)


@dataclass(frozen=True)
class Window:
    index: int
    start: float      # seconds from the video's first frame
    end: float
    shot: int         # the shot it lies in (0 when cuts are not followed)

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


def _video_time(frame: av.VideoFrame, t0: float | None) -> float:
    return float(frame.time or 0.0) - (t0 or 0.0)


def scan_cuts(source: str | Path, *, cut_distance: float = 0.2, scan_fps: float = 5.0) -> tuple[list[float], float]:
    """(cut times in seconds, the video's duration), from one streamed pass."""
    cuts: list[float] = []
    prev = None
    next_t, t0, last = 0.0, None, 0.0
    step = 1.0 / scan_fps
    try:
        with av.open(str(source)) as c:
            if not c.streams.video:
                raise DecodeError("no video stream")
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            w, h = vs.codec_context.width, vs.codec_context.height
            scale = min(1.0, 160 / max(1, max(w, h)))
            sw, sh = max(2, int(w * scale)), max(2, int(h * scale))
            for frame in c.decode(vs):
                if t0 is None:
                    t0 = float(frame.time or 0.0)
                t = _video_time(frame, t0)
                last = max(last, t)
                if t + 1e-6 < next_t:
                    continue
                next_t = t + step
                hist = colour_histogram(frame.to_ndarray(format="rgb24", width=sw, height=sh))
                if prev is not None and 0.5 * float(np.abs(hist - prev).sum()) > cut_distance:
                    cuts.append(round(t, 3))
                prev = hist
            rate = float(vs.average_rate or vs.guessed_rate or 25)
    except av.FFmpegError as e:
        raise DecodeError(f"cannot decode video: {e}") from e
    return cuts, last + 1.0 / rate


def plan_windows(duration: float, window: float, hop: float, cuts: Sequence[float] = ()) -> tuple[list[Window], list[tuple[float, float]]]:
    """(windows, shots too short for one: (start, end)). Inside a stretch of length L: one window when
    L <= window, else ceil((L - window) / hop) + 1, the last ending at the stretch's end."""
    if window <= 0 or hop <= 0:
        raise ValueError("window and hop must be positive")
    bounds = [0.0, *sorted(c for c in cuts if 0 < c < duration), duration]
    out: list[Window] = []
    short: list[tuple[float, float]] = []
    for shot, (a, b) in enumerate(zip(bounds, bounds[1:])):
        length = b - a
        if length < min(MIN_SHOT_S, window):
            short.append((a, b))
            continue
        n = 1 if length <= window else math.ceil((length - window) / hop - 1e-9) + 1
        for k in range(n):
            start = a + k * hop if k < n - 1 else max(a, b - window)
            out.append(Window(len(out), round(start, 3), round(min(b, start + window), 3), shot))
    return out, short


class _Writer:
    """One window's file, open while the video plays through it."""

    def __init__(self, path: Path, w: Window, size: tuple[int, int], rate: Fraction, audio: bool):
        self.path, self.w = path, w
        # bitexact: no random segment id or date in the file, so one window's bytes are the same every run
        self.c = av.open(str(path), "w", format="matroska", options={"fflags": "+bitexact"})
        self.time_base = 1 / rate
        self.vs = self.c.add_stream("ffv1", rate=rate)
        self.vs.width, self.vs.height = size
        self.vs.pix_fmt = "yuv420p"
        self.frames = 0
        self.audio = self.c.add_stream("pcm_s16le", rate=AUDIO_RATE, layout="mono") if audio else None
        self.samples = 0

    def video(self, frame: av.VideoFrame) -> None:
        f = frame.reformat(width=self.vs.width, height=self.vs.height, format="yuv420p")
        f.pts, f.time_base = self.frames, self.time_base
        for pkt in self.vs.encode(f):
            self.c.mux(pkt)
        self.frames += 1

    def sound(self, samples: np.ndarray, t: float) -> None:
        """``samples`` (int16, mono, 16 kHz) that start at video time ``t``: the part inside the window."""
        first = round((self.w.start - t) * AUDIO_RATE)
        last = round((self.w.end - t) * AUDIO_RATE)
        part = samples[max(0, first):max(0, last)]
        if not len(part):
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(part[None, :]), format="s16", layout="mono")
        frame.rate, frame.pts = AUDIO_RATE, self.samples
        for pkt in self.audio.encode(frame):
            self.c.mux(pkt)
        self.samples += len(part)

    def close(self) -> None:
        for pkt in self.vs.encode():
            self.c.mux(pkt)
        if self.audio is not None:
            for pkt in self.audio.encode():
                self.c.mux(pkt)
        self.c.close()


def write_windows(source: str | Path, windows: Sequence[Window], folder: str | Path, *, max_side: int = 640,
                  name: str = "window") -> Iterator[tuple[Window, Path]]:
    """Each window of ``windows`` (in time order) written into ``folder`` as ``<name>_<index>_<start ms>-<end
    ms>.mkv``, yielded as soon as the decoding has passed its end (the audio included)."""
    folder = Path(folder)
    todo = sorted(windows, key=lambda w: (w.start, w.index))
    open_: list[_Writer] = []
    try:
        with av.open(str(source)) as c:
            vs = c.streams.video[0]
            as_ = c.streams.audio[0] if c.streams.audio else None
            w, h = vs.codec_context.width, vs.codec_context.height
            scale = min(1.0, max_side / max(1, max(w, h)))
            size = (max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2))
            rate = Fraction(vs.average_rate or vs.guessed_rate or 25).limit_denominator(1001)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE) if as_ is not None else None
            # time 0 is the video stream's start (audio that comes first is kept from there on)
            t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None else None
            vt, at = -1.0, -1.0 if as_ is not None else math.inf
            nxt = 0
            streams = [s for s in (vs, as_) if s is not None]
            recent: list[tuple[float, np.ndarray]] = []   # the last second of sound, for windows opened later
            for packet in c.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        if t0 is None:
                            t0 = float(frame.time or 0.0)
                        vt = _video_time(frame, t0)
                        while nxt < len(todo) and todo[nxt].start <= vt + 1e-6:
                            win = todo[nxt]
                            wr = _Writer(folder / f"{name}_{win.index:05d}_{round(win.start * 1000)}-"
                                         f"{round(win.end * 1000)}.mkv", win, size, rate, as_ is not None)
                            for start, samples in recent:
                                wr.sound(samples, start)
                            open_.append(wr)
                            nxt += 1
                        for wr in open_:
                            if wr.w.start - 1e-6 <= vt < wr.w.end - 1e-6:
                                wr.video(frame)
                    elif t0 is not None:   # audio before the first video frame is left out
                        start = float(frame.time or 0.0) - t0
                        for out in resampler.resample(frame):
                            samples = out.to_ndarray().reshape(-1)
                            for wr in open_:
                                wr.sound(samples, start)
                            recent.append((start, samples))
                            start += len(samples) / AUDIO_RATE
                        recent = [(t, x) for t, x in recent if t + len(x) / AUDIO_RATE > start - 1.0]
                        at = start
                    done = [wr for wr in open_ if min(vt, at) >= wr.w.end - 1e-6]
                    for wr in done:
                        open_.remove(wr)
                        wr.close()
                        yield wr.w, wr.path
            for wr in open_:
                wr.close()
                yield wr.w, wr.path
            open_ = []
    except av.FFmpegError as e:
        raise DecodeError(f"cannot decode video: {e}") from e
    finally:
        for wr in open_:
            try:
                wr.c.close()
            except Exception:  # noqa: BLE001 - closing after an error: the files are discarded
                pass

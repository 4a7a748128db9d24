"""Decoding: synthetic clips written here with PyAV, plus the real sample clips when present."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from emollama.extract import decode
from emollama.extract.decode import (
    DecodeError,
    probe,
    read_audio,
    read_frames,
    segment_pair_indices,
    uniform_indices,
)

SAMPLES = Path(__file__).resolve().parents[2] / "../shared/samples/mer2023-examples"


# ---------------------------------------------------------------- helpers


def counter_frame(k: int, w: int, h: int, marker: bool = False) -> np.ndarray:
    """Frame number k (mod 1024) as grey levels: top half 8*(k % 32), bottom half 8*(k // 32 % 32)."""
    img = np.empty((h, w, 3), np.uint8)
    img[: h // 2] = 8 * (k % 32)
    img[h // 2:] = 8 * ((k // 32) % 32)
    if marker:  # a white square in the top-left corner, to check orientation
        img[: h // 4, : w // 4] = 255
    return img


def frame_number(img: np.ndarray) -> int:
    """Read the counter back from the centre of each half (rotation-safe for the marker-free part)."""
    h, w = img.shape[:2]
    top = float(np.median(img[h // 2 - h // 8: h // 2 - 2, w // 2 - 4: w // 2 + 4]))
    bottom = float(np.median(img[h // 2 + 2: h // 2 + h // 8, w // 2 - 4: w // 2 + 4]))
    return int(round(top / 8)) + 32 * int(round(bottom / 8))


def make_clip(path: Path, n_frames: int, *, rate=25, size=(64, 48), audio_seconds: float | None = None,
              rotation: int | None = None, pts_ms: list[int] | None = None, gop: int | None = None,
              marker: bool = False) -> Path:
    w, h = size
    with av.open(str(path), "w") as c:
        opts = {"preset": "ultrafast"}
        if gop:
            opts["g"] = str(gop)
        vs = c.add_stream("libx264", rate=rate, options=opts)
        # yuv420p needs even sizes: odd-sized clips are 4:4:4 H.264
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv444p" if w % 2 or h % 2 else "yuv420p"
        if rotation is not None:
            vs.set_display_rotation(rotation)
        if pts_ms is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
        ast = c.add_stream("aac", rate=44100, layout="mono") if audio_seconds else None
        for k in range(n_frames):
            f = av.VideoFrame.from_ndarray(counter_frame(k, w, h, marker), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[k], Fraction(1, 1000)
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if ast is not None:
            n = int(audio_seconds * 44100)
            sig = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)
            for i in range(0, n, 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(sig[None, i:i + 1024]), format="fltp", layout="mono")
                fr.sample_rate, fr.pts, fr.time_base = 44100, i, Fraction(1, 44100)
                for p in ast.encode(fr):
                    c.mux(p)
            for p in ast.encode():
                c.mux(p)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "ntsc": make_clip(d / "ntsc.mp4", 30, rate=Fraction(30000, 1001), size=(321, 241), audio_seconds=30 * 1001 / 30000),
        "noaudio": make_clip(d / "noaudio.mp4", 25, size=(64, 48)),
        "rot90": make_clip(d / "rot90.mp4", 10, size=(64, 48), rotation=90, marker=True),
        "big": make_clip(d / "big.mp4", 10, size=(640, 360)),
        "vfr": make_clip(d / "vfr.mp4", 10, pts_ms=[0, 40, 80, 300, 340, 380, 700, 740, 1000, 1040]),
    }


# ---------------------------------------------------------------- index helpers


def test_uniform_indices_are_bin_centres():
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(10, 10) == list(range(10))
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # repeats when the clip is short
    assert uniform_indices(7, 0) == []
    with pytest.raises(ValueError, match="positive"):
        uniform_indices(0, 4)


def test_segment_pair_indices_videomae_layout():
    idx = segment_pair_indices(160)
    assert len(idx) == 16
    assert idx[0::2] == [10, 30, 50, 70, 90, 110, 130, 150]  # middle of each of 8 segments
    assert all(b == a + 1 for a, b in zip(idx[0::2], idx[1::2]))  # then the next frame
    short = segment_pair_indices(5)
    assert len(short) == 16 and max(short) == 4 and min(short) == 0
    assert segment_pair_indices(1) == [0] * 16


# ---------------------------------------------------------------- probe


def test_probe_fractional_rate_odd_size_with_audio(clips):
    info = probe(clips["ntsc"])
    assert info.fps == pytest.approx(30000 / 1001, rel=1e-6)
    assert (info.width, info.height) == (321, 241)
    assert info.n_frames == 30
    assert info.duration == pytest.approx(30 * 1001 / 30000, abs=0.05)  # a 1 s clip
    assert info.has_video and info.has_audio and info.audio_rate == 44100
    assert info.rotation == 0


def test_probe_without_audio(clips):
    info = probe(clips["noaudio"])
    assert info.has_video and not info.has_audio and info.audio_rate is None
    assert info.n_frames == 25 and info.fps == 25.0
    assert info.duration == pytest.approx(1.0, abs=0.05)


def test_probe_rotation_swaps_displayed_size(clips):
    info = probe(clips["rot90"])
    assert info.rotation == 90
    assert (info.width, info.height) == (48, 64)  # stored 64x48, displayed upright


# ---------------------------------------------------------------- frames


def test_read_frames_order_duplicates_and_odd_size(clips):
    idx = [29, 0, 5, 5, 17]
    frames = read_frames(clips["ntsc"], idx)
    assert frames.shape == (5, 241, 321, 3) and frames.dtype == np.uint8
    assert [frame_number(f) for f in frames] == idx


def test_read_frames_clamps_past_the_end(clips):
    frames = read_frames(clips["noaudio"], [24, 25, 40, 1000])
    assert [frame_number(f) for f in frames] == [24, 24, 24, 24]


def test_read_frames_every_frame_of_uniform_sampling(clips):
    info = probe(clips["noaudio"])
    idx = uniform_indices(info.n_frames, 8)
    frames = read_frames(clips["noaudio"], idx, info=info)
    assert [frame_number(f) for f in frames] == idx


def test_read_frames_downscales_keeping_aspect(clips):
    frames = read_frames(clips["big"], [0, 9], max_side=320)
    assert frames.shape == (2, 180, 320, 3)
    assert [frame_number(f) for f in frames] == [0, 9]
    full = read_frames(clips["big"], [3], max_side=None)
    assert full.shape == (1, 360, 640, 3)


def test_read_frames_applies_rotation(clips):
    frames = read_frames(clips["rot90"], [0, 7])
    assert frames.shape == (2, 64, 48, 3)  # upright: portrait
    # the marker drawn in the stored top-left corner ends up bottom-left after a 90 degree CCW turn
    f = frames[0].astype(int)
    assert f[-4:, :4].mean() > 240
    assert f[:4, :4].mean() < 100 and f[-4:, -4:].mean() < 100
    # the counter survives the turn: stored top half (k) is now the left half, stored bottom (0) the right
    assert round(float(np.median(frames[1][10:40, 14:22])) / 8) == 7
    assert round(float(np.median(frames[1][10:40, 30:44])) / 8) == 0


def test_read_frames_variable_frame_rate_uses_timestamps(clips):
    times = np.array([0, 40, 80, 300, 340, 380, 700, 740, 1000, 1040]) / 1000
    info = probe(clips["vfr"])
    idx = list(range(info.n_frames))
    got = [frame_number(f) for f in read_frames(clips["vfr"], idx, info=info)]
    expected = [int(np.argmin(np.abs(times - k / info.fps))) for k in idx]
    assert got == expected
    assert got != idx  # a frame-counting reader would have returned 0..9


@pytest.mark.parametrize("gop", [10, 50])  # keyframes closer / farther apart than the seek gap
def test_read_frames_seek_mode_matches_sequential(tmp_path, monkeypatch, gop):
    clip = make_clip(tmp_path / "long.mp4", 200, size=(32, 32), gop=gop)
    idx = [199, 3, 60, 61, 150, 120, 0, 198, 260]
    sequential = [frame_number(f) for f in read_frames(clip, idx)]
    monkeypatch.setattr(decode, "LONG_CLIP_SECONDS", 1.0)
    monkeypatch.setattr(decode, "SEEK_GAP_SECONDS", 0.5)
    seeking = [frame_number(f) for f in read_frames(clip, idx)]
    expected = [min(k, 199) for k in idx]
    assert sequential == expected
    assert seeking == expected


def test_frame_folder(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for k in range(12):  # frame_1.jpg .. frame_12.jpg: natural order, not 1, 10, 11, 12, 2, ...
        Image.fromarray(counter_frame(k, 40, 30)).save(folder / f"frame_{k + 1}.jpg", quality=95)
    (folder / "notes.txt").write_text("not a frame")
    info = probe(folder, folder_fps=10)
    assert (info.n_frames, info.fps, info.width, info.height) == (12, 10, 40, 30)
    assert info.duration == pytest.approx(1.2)
    assert not info.has_audio
    frames = read_frames(folder, [11, 2, 10, 50])
    assert frames.shape == (4, 30, 40, 3)
    assert [frame_number(f) for f in frames] == [11, 2, 10, 11]
    assert read_audio(folder).shape == (0,)


def test_empty_frame_folder_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="no video stream"):
        probe(tmp_path)


# ---------------------------------------------------------------- audio


def test_read_audio_length_and_range(clips):
    info = probe(clips["ntsc"])
    audio = read_audio(clips["ntsc"])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - info.duration * 16000) <= 0.05 * 16000
    assert np.abs(audio).max() <= 1.0
    assert 0.4 < np.abs(audio[1000:14000]).max() < 0.6  # the 0.5 sine came through (AAC rings at the hard cut)
    spectrum = np.abs(np.fft.rfft(audio[2000:14000]))
    assert np.fft.rfftfreq(12000, 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=3)


def test_read_audio_other_rate(clips):
    audio = read_audio(clips["ntsc"], sample_rate=8000)
    assert abs(len(audio) - 1.001 * 8000) <= 0.05 * 8000


def test_read_audio_empty_without_audio_stream(clips):
    audio = read_audio(clips["noaudio"])
    assert audio.shape == (0,) and audio.dtype == np.float32


# ---------------------------------------------------------------- bad input


def test_random_bytes_is_a_decode_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match="cannot open"):
        probe(bad)
    with pytest.raises(DecodeError):
        read_frames(bad, [0])
    with pytest.raises(DecodeError):
        read_audio(bad)


def test_zero_byte_and_missing_files(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(DecodeError, match="zero length"):
        probe(empty)
    with pytest.raises(DecodeError, match="zero length"):
        read_audio(empty)
    with pytest.raises(DecodeError, match="not found"):
        probe(tmp_path / "missing.mp4")


def test_audio_only_file_has_no_video(tmp_path):
    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w") as c:
        ast = c.add_stream("aac", rate=16000, layout="mono")
        sig = np.zeros((1, 1024), np.float32)
        for i in range(10):
            fr = av.AudioFrame.from_ndarray(sig, format="fltp", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = 16000, i * 1024, Fraction(1, 16000)
            for p in ast.encode(fr):
                c.mux(p)
        for p in ast.encode():
            c.mux(p)
    info = probe(path)
    assert not info.has_video and info.has_audio
    with pytest.raises(DecodeError, match="no video stream"):
        read_frames(path, [0], info=info)
    assert len(read_audio(path)) > 0


# ---------------------------------------------------------------- real clips


@pytest.mark.samples
@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples/mer2023-examples is absent")
def test_real_clips_decode():
    clips = sorted(SAMPLES.glob("*.mp4"))
    assert len(clips) == 10
    timings = []
    for clip in clips:
        t0 = time.perf_counter()
        info = probe(clip)
        frames = read_frames(clip, uniform_indices(info.n_frames, 16), info=info)
        t1 = time.perf_counter()
        audio = read_audio(clip)
        t2 = time.perf_counter()
        timings.append((clip.name, t1 - t0, t2 - t1))
        assert info.has_video and info.has_audio and info.audio_rate == 44100
        assert 1.5 < info.duration < 11 and info.fps in (24.0, 25.0)
        assert frames.shape[0] == 16 and frames.shape[-1] == 3 and max(frames.shape[1:3]) <= 1280
        assert frames.reshape(16, -1).std(axis=1).min() > 5  # real pictures, not blank frames
        assert abs(len(audio) / 16000 - info.duration) < 0.15
        assert np.abs(audio).max() > 0.01
    for name, tf, ta in timings:
        print(f"{name}: probe+16 frames {tf:.3f} s, audio {ta:.3f} s")

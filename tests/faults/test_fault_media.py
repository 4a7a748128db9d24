"""Fault suite, media timing and folder datasets (issue 20, items 7 and 8): a clip's duration and
frame count are its video stream's (never the audio's), joined transport streams are counted whole,
and every file of a folder dataset is a clip or listed with its reason. docs/faults.md tabulates them.

The clips are written here with PyAV; each frame shows its own number (tests/extract/test_decode.py's
counter), so a test reads back which frames were sampled. One folder holding every case is
extracted once (tiny profile, in process)."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from emollama.extract import decode
from emollama.extract.step import ClipJob, ExtractSettings, FrameSettings, frame_plan, prepare
from emollama.pipeline.cli import app
from emollama.store import FeatureStore

sys.path.insert(0, str(Path(__file__).parents[1] / "extract"))
from test_decode import counter_frame, frame_number  # noqa: E402

runner = CliRunner()
pytestmark = pytest.mark.slow


def write(path: Path, frames: int, *, start: int = 0, fmt: str | None = None, codec: str = "libx264",
          pix_fmt: str = "yuv420p", audio: str | None = None, audio_s: float | None = None, audio_rate: int = 16000,
          container_options: dict | None = None) -> Path:
    """A 64x48 clip at 25 fps whose frame k shows the number start + k (no video stream for 0 frames);
    with `audio`, silence of `audio_s` seconds (default: as long as the video) in that codec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
        if frames:
            vs = c.add_stream(codec, rate=25, options={"preset": "ultrafast"} if codec == "libx264" else {})
            vs.width, vs.height, vs.pix_fmt = 64, 48, pix_fmt
        aus = c.add_stream(audio, rate=audio_rate, layout="mono") if audio else None
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(counter_frame(start + k, 64, 48), format="rgb24")
            for p in vs.encode(frame if pix_fmt == "yuv420p" else frame.reformat(format=pix_fmt)):
                c.mux(p)
        for p in vs.encode() if frames else ():
            c.mux(p)
        if aus is not None:
            # AAC and Opus take frames of their own size; the others one second at a time (fast)
            n = int((audio_s or frames / 25) * audio_rate)
            chunk = aus.codec_context.frame_size if audio in ("aac", "libopus") else audio_rate
            sample = "s16" if audio in ("flac", "pcm_s16le") else "fltp"
            silence = np.zeros((1, chunk), np.int16 if sample == "s16" else np.float32)
            for i in range(0, n, chunk):
                af = av.AudioFrame.from_ndarray(silence, format=sample, layout="mono")
                af.sample_rate, af.pts, af.time_base = audio_rate, i, Fraction(1, audio_rate)
                for p in aus.encode(af):
                    c.mux(p)
            for p in aus.encode():
                c.mux(p)
    return path


# every kind of file the folder dataset meets: videos by extension, videos it must probe, and the rest
VIDEOS = {
    "broadcast.ts": dict(fmt="mpegts", audio="aac"),
    "camcorder.mts": dict(fmt="mpegts", container_options={"mpegts_m2ts_mode": "1"}, audio="aac"),
    "bluray.m2ts": dict(fmt="mpegts", container_options={"mpegts_m2ts_mode": "1"}),
    "phone.3gp": dict(fmt="3gp", audio="aac"),
    "web.ogv": dict(fmt="ogg", codec="libvpx", audio="libopus", audio_rate=48000),
    "meme.gif": dict(fmt="gif", codec="gif", pix_fmt="rgb8"),
    "dvd.vob": dict(fmt="vob", codec="mpeg2video"),
    "studio.mxf": dict(fmt="mxf", codec="mpeg2video"),
    "ffmpeg.nut": dict(fmt="nut", codec="mpeg4"),
    "raw.y4m": dict(fmt="yuv4mpegpipe", codec="rawvideo"),
    "windows.asf": dict(fmt="asf", codec="wmv2"),
    "sub/renamed.video": dict(fmt="matroska", audio="aac"),   # an extension nobody lists: probed
    "sub/no extension": dict(fmt="mpegts"),
}
NOT_VIDEOS = {   # file -> the reason listed (how it begins)
    "notes.txt": "notes.txt: a text file, not a video",
    "cover.jpg": "cover.jpg: an image, not a video",
    "voice.wav": "voice.wav: an audio file, not a video",
    "sound.ogg": "sound.ogg: no video stream (audio only) in this ogg file",
    "junk.dat": "junk.dat: not a video PyAV can open (",
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    data = tmp_path_factory.mktemp("media") / "data"
    write(data / "long audio.mkv", 114, audio="aac", audio_s=60.0)          # 4.56 s of video, 60 s of audio
    a = write(data.parent / "a.ts", 154, fmt="mpegts", audio="aac")         # 6.16 s, frames 0..153
    b = write(data.parent / "b.ts", 114, start=154, fmt="mpegts", audio="aac")   # 4.56 s, frames 154..267
    (data / "joined.ts").write_bytes(a.read_bytes() + b.read_bytes())     # cat a.ts b.ts > joined.ts
    for name, kw in VIDEOS.items():
        write(data / name, 20, **kw)
    (data / "notes.txt").write_text("shot on a phone\n")
    Image.fromarray(counter_frame(0, 32, 32)).save(data / "cover.jpg")          # FFmpeg opens it as one frame
    write(data / "voice.wav", 0, audio="pcm_s16le", audio_s=1.0)
    write(data / "sound.ogg", 0, fmt="ogg", audio="flac", audio_s=1.0)
    (data / "junk.dat").write_bytes(np.random.default_rng(0).bytes(4096))
    store = data.parent / "store.zarr"
    r = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(data), "--store", str(store),
                            "--profile", "tiny", "--workers", "0", "--no-progress", "--missing-audio", "silence",
                            "--json"])
    out = json.loads(r.stdout[r.stdout.index("{"):])
    return {"exit": r.exit_code, "out": out, "data": data, "records": FeatureStore.open(store).records(),
            "files": sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())}


def sampled(path: Path, frames: FrameSettings = FrameSettings()) -> list[int]:
    """The frame numbers shown by the face frames `prepare` decodes for the clip at `path`."""
    prep = prepare(ClipJob("x", str(path)), ExtractSettings(encoders=None, frames=frames), detector=None)
    assert prep.error is None, prep.error
    look = prep.waiting.look
    return [frame_number(f) for f in look.frames[look.plan.local]]


def test_audio_longer_than_video_is_recorded_with_the_videos_duration_and_frames(media):
    # the fault: 1,500 frames and 60 s (the container's duration, the audio's), frames sampled past the end
    rec = media["records"]["long audio"]
    assert rec["status"] == "ok" and rec["frames"] == 114 and abs(rec["duration"] - 4.56) < 0.01
    assert rec["frames_from"] == "packets (the video stream's header gives no frame count)"
    local = FrameSettings().local_frames
    assert sampled(media["data"] / "long audio.mkv") == decode.uniform_indices(114, local)   # over the video


def test_an_hour_of_audio_does_not_turn_the_face_crops_into_one_frame(tmp_path):
    # the fault: with 3,600 s of audio every one of the 24 face frames was the last frame
    clip = write(tmp_path / "hour.mkv", 114, audio="flac", audio_s=3600.0, audio_rate=8000)
    info = decode.probe(clip)
    assert (info.n_frames, round(info.duration, 2), info.parts) == (114, 4.56, 1)
    frames = FrameSettings(local_frames=24)
    wanted, local, _ = frame_plan(info.n_frames, frames)
    got = decode.read_frames(clip, wanted, info=info)[local]
    assert [frame_number(f) for f in got] == decode.uniform_indices(114, 24)   # 24 different frames, in order


def test_two_transport_streams_joined_with_cat_are_counted_by_their_packets(media):
    # the fault: 6.16 of the 10.72 s (the first part's timestamps), the second part never sampled
    info = decode.probe(media["data"] / "joined.ts")
    assert (info.n_frames, round(info.duration, 2), info.parts) == (268, 10.72, 2)
    rec = media["records"]["joined"]
    assert rec["status"] == "ok" and rec["frames"] == 268 and abs(rec["duration"] - 10.72) < 0.01
    assert rec["frames_from"] == "packets (2 parts joined end to end, each restarting its timestamps)"
    got = sampled(media["data"] / "joined.ts")
    assert got == decode.uniform_indices(268, FrameSettings().local_frames)
    assert sum(k >= 154 for k in got) >= 6                               # the second part is sampled


def test_every_file_of_a_folder_dataset_is_a_clip_or_listed_with_its_reason(media):
    # the fault: .ts, .mts, .3gp, .ogv, .gif, ... were dropped without a word ("13 in corpus, 0 rejected")
    out = media["out"]
    assert media["exit"] == 0 and not out["failed"]
    clips = {Path(n).with_suffix("").as_posix().replace("/", "%2F") for n in VIDEOS} | {"long audio", "joined"}
    assert sorted(out["ok"]) == sorted(clips) and out["total"] == len(clips)
    rejected = dict(out["rejected"])
    assert sorted(rejected) == sorted(Path(n).stem for n in NOT_VIDEOS)
    assert all(rejected[Path(n).stem].startswith(why) for n, why in NOT_VIDEOS.items()), rejected
    assert out["total"] + len(out["rejected"]) == len(media["files"]) == 20
    assert all(media["records"][c]["status"] == "ok" for c in clips)

"""A small synthetic labelled dataset in the MERR layout (the offline default for demo and tests).

Every clip is a real encoded mp4 (H.264 yuv420p + AAC 44.1 kHz stereo) written with PyAV.
The label shows in both picture and sound:

* picture: a drawn face (shaded skin oval, eyes with whites, irises and pupils, eyebrows,
  nose, lips, hair, ears, neck) on a textured background. The expression encodes the label
  through the mouth curve and opening, the eyebrow angle and height and the eye opening;
  its intensity swells to a peak frame (recorded as ``peak_index``). The mouth also moves
  with the syllables of the voice.
* sound: a voice-like harmonic complex with vowel-like formants, a label-dependent pitch
  level and contour, syllable-like amplitude envelope and a little noise.

The subtitles come from a neutral pool and do not give the label away.
Everything is deterministic for a seed.

A sample never replaces or deletes a file of the user's: it writes only into an empty or new folder,
or over its own earlier sample, which it recognises by its marker file (``.emollama-sample.json``,
the sha256 of every file it wrote). A folder that holds anything else is refused
(``SampleFolderError``); with ``force`` the sample is written beside those files as long as none of
them would be replaced. An earlier sample's file that was edited since counts as the user's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise")
AUDIO_RATE = 44100


@dataclass(frozen=True)
class Expression:
    mouth_curve: float  # corner lift relative to the mouth centre, in face half-heights (+ smile, - frown)
    mouth_open: float  # resting mouth opening, in face half-heights
    mouth_width: float  # half-width of the mouth, in face half-widths
    brow_raise: float  # brow lift above neutral, in face half-heights
    brow_tilt: float  # inner-end lift relative to the outer end (+ sad/worried, - angry)
    eye_open: float  # eye opening factor (1 neutral)


@dataclass(frozen=True)
class Voice:
    f0: float  # base pitch (Hz)
    contour: str  # shape of the pitch over each syllable and the whole utterance
    syllable_rate: float  # syllables per second
    tilt: float  # spectral tilt: harmonic h has amplitude h**-tilt (low = bright, high = dull)
    loudness: float  # peak amplitude
    breath: float  # noise level relative to the voice


EXPRESSIONS = {
    "neutral": Expression(0.0, 0.02, 0.30, 0.00, 0.00, 1.00),
    "angry": Expression(-0.05, 0.04, 0.26, -0.05, -0.14, 0.70),
    "happy": Expression(0.14, 0.07, 0.36, 0.03, 0.00, 0.80),
    "sad": Expression(-0.10, 0.01, 0.26, 0.00, 0.12, 0.75),
    "worried": Expression(-0.03, 0.04, 0.24, 0.05, 0.10, 1.10),
    "surprise": Expression(0.00, 0.20, 0.18, 0.12, 0.02, 1.45),
}

VOICES = {
    "neutral": Voice(130.0, "flat", 3.5, 1.3, 0.5, 0.03),
    "angry": Voice(185.0, "fall", 5.0, 0.9, 0.85, 0.05),
    "happy": Voice(230.0, "risefall", 4.5, 1.1, 0.7, 0.03),
    "sad": Voice(110.0, "decline", 2.5, 1.7, 0.35, 0.08),
    "worried": Voice(165.0, "tremolo", 4.0, 1.4, 0.5, 0.06),
    "surprise": Voice(250.0, "rise", 3.5, 1.1, 0.75, 0.04),
}

VALENCE = {"neutral": 0.0, "angry": -1.5, "happy": 1.6, "sad": -1.3, "worried": -0.8, "surprise": 0.5}

AU_LIST = {
    "neutral": [],
    "angry": ["AU04", "AU07", "AU23"],
    "happy": ["AU06", "AU12", "AU25"],
    "sad": ["AU01", "AU04", "AU15"],
    "worried": ["AU01", "AU02", "AU04", "AU20"],
    "surprise": ["AU01", "AU02", "AU05", "AU26"],
}

VISUAL_CUES = {
    "neutral": ["relaxed eyebrows", "a straight, closed mouth", "eyes open normally"],
    "angry": ["eyebrows drawn down toward the nose", "narrowed eyes", "tightly pressed, down-turned lips"],
    "happy": ["lip corners pulled up into a smile", "cheeks raised", "slightly narrowed eyes"],
    "sad": ["inner eyebrows raised", "drooping eyelids", "lip corners pulled down"],
    "worried": ["eyebrows raised and drawn together", "widened eyes", "lips stretched tight"],
    "surprise": ["eyebrows raised high", "eyes wide open", "jaw dropped with a rounded mouth"],
}

AUDIO_CUES = {
    "neutral": ["a level, moderate pitch", "an even speaking rate"],
    "angry": ["a loud, harsh voice", "sharply falling pitch on each syllable", "a fast speaking rate"],
    "happy": ["a high, lively pitch", "rising and falling intonation", "a bright tone"],
    "sad": ["a low, quiet voice", "pitch that sinks over the sentence", "a slow, breathy delivery"],
    "worried": ["a trembling voice", "a slightly raised, unsteady pitch"],
    "surprise": ["a sudden upward leap in pitch", "a high, exclamatory tone"],
}

SENTENCES = [
    "I didn't expect to see you here today.",
    "We need to talk about what happened yesterday.",
    "The train leaves at seven in the morning.",
    "Did you hear what she said at the meeting?",
    "I'll call you back when I get home.",
    "They moved the whole office to another floor.",
    "Can you pass me the report on the table?",
    "He told me the results would come out next week.",
    "We have been waiting here for almost an hour.",
    "The phone rang just as I was leaving.",
    "Let me know what you decide about the trip.",
    "She finally answered the letter this afternoon.",
    "There is something I have to tell you.",
    "The shop on the corner closed last month.",
    "I looked everywhere for the keys this morning.",
    "You said you would be here by noon.",
    "My brother is coming to visit this weekend.",
    "They changed the rules without telling anyone.",
    "It rained all night and the road is flooded.",
    "I read your message only a minute ago.",
]


# ---------------------------------------------------------------- picture


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth two-colour gradient with soft blobs and a little grain (a room-like backdrop)."""
    c1 = rng.uniform(60, 200, 3)
    c2 = rng.uniform(40, 180, 3)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle)) + 0.5
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    for _ in range(5):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.35) * w
        col = rng.uniform(30, 220, 3)
        m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * 0.5
        img = img * (1 - m) + col * m
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


HAIR = [(35, 25, 20), (70, 45, 25), (110, 75, 40), (150, 110, 60), (25, 22, 22), (120, 60, 30), (90, 85, 80)]


def _skin(rng: np.random.Generator) -> np.ndarray:
    base = np.array([224, 172, 138], np.float32)  # light
    dark = np.array([141, 85, 56], np.float32)  # dark
    t = rng.uniform(0, 1)
    return base * (1 - t) + dark * t + rng.normal(0, 6, 3)


@dataclass
class _Look:
    """Per-clip appearance (fixed over the clip)."""

    cx: float
    cy: float
    a: float  # face half-width (px)
    b: float  # face half-height (px)
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    shirt: np.ndarray
    lip: np.ndarray


def _make_look(rng: np.random.Generator, w: int, h: int) -> _Look:
    size = rng.uniform(0.30, 0.36) * h
    skin = _skin(rng)
    return _Look(
        cx=w / 2 + rng.uniform(-0.08, 0.08) * w,
        cy=h * 0.48 + rng.uniform(-0.04, 0.04) * h,
        a=size * rng.uniform(0.74, 0.80),
        b=size,
        skin=skin,
        hair=np.array(HAIR[int(rng.integers(len(HAIR)))], np.float32) * rng.uniform(0.85, 1.15),
        iris=np.array(rng.choice([[70, 45, 25], [60, 90, 130], [80, 100, 60], [40, 30, 25]]), np.float32),
        shirt=rng.uniform(20, 220, 3),
        lip=skin * np.array([0.85, 0.55, 0.55]),
    )


def _face_layer(look: _Look, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """The static head (hair, ears, neck, shoulders, shaded skin) as RGB + alpha, at (0, 0) offset."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, cx, cy = look.a, look.b, look.cx, look.cy
    rgb = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)

    def put(mask: np.ndarray, color: np.ndarray) -> None:
        nonlocal rgb, alpha
        m = mask[..., None]
        rgb = rgb * (1 - m) + color * m
        alpha = np.maximum(alpha, mask)

    def soft(d: np.ndarray, width: float = 1.5) -> np.ndarray:  # d < 0 inside
        return np.clip(0.5 - d / width, 0, 1)

    # shoulders + neck
    sh = soft(np.maximum((((xx - cx) / (2.2 * a)) ** 2 + ((yy - (cy + 2.35 * b)) / (1.2 * b)) ** 2) - 1, 0) * 40)
    put(sh, look.shirt)
    neck = soft(np.maximum(np.abs(xx - cx) - 0.45 * a, np.abs(yy - (cy + 1.1 * b)) - 0.45 * b))
    put(neck, look.skin * 0.8)
    # hair behind the head
    hair_d = np.sqrt(((xx - cx) / (1.13 * a)) ** 2 + ((yy - (cy - 0.08 * b)) / (1.1 * b)) ** 2) - 1
    put(soft(hair_d * 40) * (yy < cy + 0.3 * b), look.hair)
    # ears
    for s in (-1, 1):
        ed = np.sqrt(((xx - (cx + s * 0.97 * a)) / (0.16 * a)) ** 2 + ((yy - (cy + 0.05 * b)) / (0.22 * b)) ** 2) - 1
        put(soft(ed * 12), look.skin * 0.85)
    # face oval with radial shading (lit from the upper left)
    r = np.sqrt(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2)
    face = soft((r - 1) * 40)
    shade = 1.05 - 0.28 * np.clip(r, 0, 1) ** 2.5 - 0.06 * ((xx - cx) / a) - 0.03 * ((yy - cy) / b)
    skin = look.skin[None, None, :] * shade[..., None]
    # eye sockets and cheek warmth
    for s in (-1, 1):
        sock = np.exp(-(((xx - (cx + s * 0.38 * a)) / (0.3 * a)) ** 2 + ((yy - (cy - 0.2 * b)) / (0.14 * b)) ** 2))
        skin = skin * (1 - 0.14 * sock[..., None])
        cheek = np.exp(-(((xx - (cx + s * 0.5 * a)) / (0.22 * a)) ** 2 + ((yy - (cy + 0.25 * b)) / (0.14 * b)) ** 2))
        skin = skin + cheek[..., None] * np.array([18.0, -4.0, -4.0])
    # nose shadow
    ns = np.exp(-(((xx - (cx + 0.06 * a)) / (0.07 * a)) ** 2 + ((yy - (cy + 0.05 * b)) / (0.22 * b)) ** 2))
    skin = skin * (1 - 0.12 * ns[..., None])
    m = face[..., None]
    rgb = rgb * (1 - m) + skin * m
    alpha = np.maximum(alpha, face)
    # fringe of hair over the forehead
    fr = np.sqrt(((xx - cx) / (1.02 * a)) ** 2 + ((yy - (cy - 0.62 * b)) / (0.42 * b)) ** 2) - 1
    put(soft(fr * 30) * (yy < cy - 0.62 * b), look.hair)
    return np.clip(rgb, 0, 255), alpha


def _draw_features(draw: ImageDraw.ImageDraw, look: _Look, e: Expression, s: float, talk: float,
                   dx: float, dy: float, blink: float) -> None:
    """Eyes, brows, nose and mouth for expression ``e`` at intensity ``s`` (0..1)."""
    a, b = look.a, look.b
    cx, cy = look.cx + dx, look.cy + dy
    col = lambda c: tuple(int(v) for v in np.clip(c, 0, 255))  # noqa: E731
    eye_open = 1 + (e.eye_open - 1) * s
    # eyes
    ew, eh = 0.20 * a, 0.085 * b * eye_open * (1 - blink)
    for sgn in (-1, 1):
        ex, ey = cx + sgn * 0.38 * a, cy - 0.18 * b
        if eh > 1.0:
            draw.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=(245, 242, 238), outline=col(look.skin * 0.45), width=2)
            ir = min(0.095 * a, eh * 1.05)
            draw.ellipse([ex - ir, ey - ir, ex + ir, ey + ir], fill=col(look.iris))
            pr = ir * 0.45
            draw.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=(12, 10, 10))
            draw.ellipse([ex - pr * 0.9 + ir * 0.3, ey - ir * 0.55, ex + ir * 0.45, ey - ir * 0.2], fill=(250, 250, 250))
            # upper lid line
            draw.arc([ex - ew, ey - eh, ex + ew, ey + eh], 190, 350, fill=col(look.skin * 0.25), width=2)
        else:
            draw.line([ex - ew, ey, ex + ew, ey], fill=col(look.skin * 0.35), width=2)
        # brow: outer end and inner end heights
        base_y = cy - 0.40 * b - e.brow_raise * s * b
        inner = base_y - e.brow_tilt * s * b
        outer = base_y + e.brow_tilt * s * b * 0.3
        xi, xo = cx + sgn * 0.13 * a, cx + sgn * 0.62 * a
        xm = (xi + xo) / 2
        ym = (inner + outer) / 2 - 0.03 * b
        bw = max(2, int(0.055 * b))
        draw.line([(xo, outer), (xm, ym), (xi, inner)], fill=col(look.hair * 0.7), width=bw, joint="curve")
    # nose
    nc = col(look.skin * 0.55)
    draw.line([(cx + 0.02 * a, cy - 0.1 * b), (cx + 0.07 * a, cy + 0.22 * b)], fill=col(look.skin * 0.75), width=2)
    draw.arc([cx - 0.17 * a, cy + 0.13 * b, cx + 0.17 * a, cy + 0.3 * b], 20, 160, fill=nc, width=2)
    for sgn in (-1, 1):
        nx = cx + sgn * 0.08 * a
        draw.ellipse([nx - 0.035 * a, cy + 0.22 * b, nx + 0.035 * a, cy + 0.26 * b], fill=col(look.skin * 0.4))
    # mouth: corners at +-mw, corner lift `curve`, opening `op`
    my = cy + 0.52 * b
    mw = (0.30 + (e.mouth_width - 0.30) * s) * a
    curve = e.mouth_curve * s * b
    op = max(0.0, e.mouth_open * s * b + talk * 0.06 * b)
    n = 12
    xs = np.linspace(-1, 1, n)
    bend = curve * (1 - xs ** 2)  # centre relative to the corners: >0 pushes the centre down (smile)
    upper = [(cx + x * mw, my - curve + bd - op * 0.35 * (1 - x ** 2)) for x, bd in zip(xs, bend)]
    lower = [(cx + x * mw, my - curve + bd + op * 0.65 * (1 - x ** 2) + 0.02 * b * (1 - x ** 2)) for x, bd in zip(xs, bend)]
    lip = col(look.lip)
    if op > 1.5:
        draw.polygon(upper + lower[::-1], fill=(60, 20, 25), outline=lip)
        if op > 4:  # teeth
            teeth = [(x, y + 1) for x, y in upper[3:-3]]
            draw.line(teeth, fill=(235, 232, 225), width=max(1, int(op * 0.25)))
        draw.line(upper, fill=lip, width=max(2, int(0.04 * b)), joint="curve")
        draw.line(lower, fill=lip, width=max(2, int(0.05 * b)), joint="curve")
    else:
        draw.line(lower, fill=lip, width=max(2, int(0.06 * b)), joint="curve")
        draw.line(upper, fill=col(look.lip * 0.5), width=2, joint="curve")


def render_frames(label: str, rng: np.random.Generator, n_frames: int, size: tuple[int, int],
                  talk: np.ndarray, peak: int) -> np.ndarray:
    """[n_frames, H, W, 3] uint8 frames of one clip; ``talk`` is the mouth motion per frame (0..1)."""
    w, h = size
    bg = _background(rng, w, h)
    look = _make_look(rng, w, h)
    face_rgb, face_a = _face_layer(look, w, h)
    face_rgb, face_a, bgf = face_rgb.astype(np.float32), face_a.astype(np.float32), bg.astype(np.float32)
    e = EXPRESSIONS[label]
    phase = rng.uniform(0, 2 * math.pi, 2)
    blink_at = int(rng.integers(0, n_frames))
    out = np.empty((n_frames, h, w, 3), np.uint8)
    width_peak = max(3.0, n_frames / 5)
    for i in range(n_frames):
        dx = 0.03 * w * math.sin(2 * math.pi * i / n_frames + phase[0])
        dy = 0.015 * h * math.sin(4 * math.pi * i / n_frames + phase[1])
        sx, sy = int(round(dx)), int(round(dy))
        fa = np.roll(face_a, (sy, sx), axis=(0, 1))[..., None]
        fr = np.roll(face_rgb, (sy, sx), axis=(0, 1))
        frame = (bgf + (fr - bgf) * fa).astype(np.uint8)
        img = Image.fromarray(frame)
        s = 0.55 + 0.45 * math.exp(-((i - peak) / width_peak) ** 2)
        blink = 0.85 if abs(i - blink_at) == 0 and label != "surprise" else 0.0
        _draw_features(ImageDraw.Draw(img), look, e, s, float(talk[i]), sx, sy, blink)
        out[i] = np.asarray(img)
    return out


# ---------------------------------------------------------------- sound

_VOWELS = {  # formants F1, F2, F3 (Hz)
    "a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (300, 2200, 2900),
    "o": (570, 840, 2410), "u": (440, 1020, 2240),
}


def _syllables(rng: np.random.Generator, seconds: float, rate: float) -> list[tuple[float, float]]:
    """(onset, duration) of each syllable, with a short lead-in and one phrase pause."""
    out, t = [], rng.uniform(0.08, 0.18)
    pause_at = seconds * rng.uniform(0.45, 0.6)
    paused = False
    while t < seconds - 0.12:
        d = rng.uniform(0.7, 1.0) / rate
        out.append((t, min(d, seconds - 0.05 - t)))
        t += d + rng.uniform(0.0, 0.25) / rate
        if not paused and t > pause_at:
            t += rng.uniform(0.12, 0.2)
            paused = True
    return out


def _envelope(sylls: list[tuple[float, float]], t: np.ndarray) -> np.ndarray:
    env = np.zeros_like(t)
    for on, d in sylls:
        x = (t - on) / d
        m = (x >= 0) & (x <= 1)
        env[m] = np.maximum(env[m], np.sin(np.pi * x[m]) ** 0.7)
    return env


def _pitch(voice: Voice, t: np.ndarray, sylls: list[tuple[float, float]], seconds: float, f0: float) -> np.ndarray:
    u = t / seconds  # position in the utterance 0..1
    local = np.zeros_like(t)  # position within the current syllable 0..1
    for on, d in sylls:
        m = (t >= on) & (t <= on + d)
        local[m] = (t[m] - on) / d
    c = voice.contour
    if c == "flat":
        f = f0 * (1 - 0.08 * u + 0.03 * np.sin(2 * np.pi * local))
    elif c == "fall":
        f = f0 * (1.25 - 0.4 * local) * (1 - 0.05 * u)
    elif c == "risefall":
        f = f0 * (1 + 0.25 * np.sin(np.pi * local)) * (1 + 0.1 * np.sin(2 * np.pi * u))
    elif c == "decline":
        f = f0 * (1.05 - 0.25 * u) * (1 - 0.04 * local)
    elif c == "tremolo":
        f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 7 * t)) * (1 + 0.12 * u)
    elif c == "rise":
        f = f0 * (0.75 + 0.55 * np.clip(u * 3, 0, 1)) * (1 + 0.08 * local)
    else:  # pragma: no cover - guarded by VOICES
        raise ValueError(c)
    return f


def render_voice(label: str, rng: np.random.Generator, seconds: float, rate: int = AUDIO_RATE) -> tuple[np.ndarray, list]:
    """Mono float32 voice-like signal and its syllables."""
    voice = VOICES[label]
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    sylls = _syllables(rng, seconds, voice.syllable_rate * rng.uniform(0.9, 1.1))
    env = _envelope(sylls, t)
    f0 = _pitch(voice, t, sylls, seconds, voice.f0 * rng.uniform(0.9, 1.1))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    # formants per syllable, interpolated between syllables
    vowel_keys = list(_VOWELS)
    fm = np.zeros((n, 3))
    for on, d in sylls:
        m = (t >= on) & (t <= on + d)
        fm[m] = _VOWELS[vowel_keys[int(rng.integers(len(vowel_keys)))]]
    fm[fm[:, 0] == 0] = _VOWELS["a"]
    sig = np.zeros(n)
    hop = 64  # harmonic amplitudes change slowly: compute them every `hop` samples
    f0c, fmc = f0[::hop], fm[::hop]
    for h in range(1, 40):
        fh = f0c * h
        if np.all(fh > 5000):
            break
        amp = h ** -voice.tilt * (0.3 + sum(np.exp(-0.5 * ((fh - fmc[:, k]) / (90 + 40 * k)) ** 2) for k in range(3)))
        amp = np.repeat(amp * (fh < 5000), hop)[:n]
        sig += amp * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    sig /= np.max(np.abs(sig)) + 1e-9
    noise = rng.normal(0, 1, n)
    y = env * (sig + voice.breath * noise) + 0.004 * noise
    y = y / (np.max(np.abs(y)) + 1e-9) * voice.loudness
    return y.astype(np.float32), sylls


# ---------------------------------------------------------------- encoding


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None, audio_rate: int = AUDIO_RATE,
              stereo: bool = True) -> None:
    """Encode RGB frames (H.264 yuv420p) and optional mono float audio (AAC) into ``path``."""
    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        ast = None
        if audio is not None:
            ast = c.add_stream("aac", rate=audio_rate, layout="stereo" if stereo else "mono")
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if ast is not None:
            data = np.stack([audio, audio]) if stereo else audio[None]
            step = 1024
            for i in range(0, data.shape[1], step):
                chunk = np.ascontiguousarray(data[:, i:i + step], dtype=np.float32)
                fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo" if stereo else "mono")
                fr.sample_rate = audio_rate
                fr.pts = i
                fr.time_base = Fraction(1, audio_rate)
                for p in ast.encode(fr):
                    c.mux(p)
            for p in ast.encode():
                c.mux(p)


# ---------------------------------------------------------------- captions

_COARSE = [
    "In the video, the person shows {v}. The voice has {a}. Together these cues suggest that the person feels {label}.",
    "The face shows {v}, and the speech carries {a}; the overall emotional state is {label}.",
    "We can see {v} on the person's face while hearing {a} in the voice, which points to {label}.",
]
_FINE = [
    "The person's {v0} and {v1} ({aus}) are typical of {label}. The voice supports this: {a}. "
    "The words \"{text}\" say little about the feeling by themselves, so the label comes from the face and the voice: {label}.",
    "Looking at the face, {v0} together with {v1} indicate {label}. In the audio we hear {a}, which is consistent with it. "
    "The subtitle \"{text}\" is emotionally neutral, so face and voice decide: the emotion is {label}.",
]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(label: str, text: str, rng: np.random.Generator) -> tuple[str, str]:
    v, a = VISUAL_CUES[label], AUDIO_CUES[label]
    coarse = _COARSE[int(rng.integers(len(_COARSE)))].format(v=_join(v), a=_join(a), label=label)
    aus = ", ".join(AU_LIST[label]) or "no strong action units"
    fine = _FINE[int(rng.integers(len(_FINE)))].format(
        v0=v[0], v1=v[1], aus=aus, a=_join(a), text=text.rstrip(".?!"), label=label)
    return coarse, fine


_README = """# Synthetic emollama sample dataset

This folder was generated by `emollama sample` (emollama's `extract/sample.py`, seed {seed}).
It is **synthetic**: no real person or recording is involved. It exists so that the whole
pipeline can run offline, quickly, with no download, and so that tests have real encoded videos.

- {clips} clips, {seconds:g} s each, {w}x{h} at {fps} fps, H.264 (yuv420p) + AAC 44.1 kHz stereo,
  in `video/`.
- Labels: the six MER2023 labels ({labels}), balanced; `split.csv` holds a train/test split
  stratified by label (test fraction {test_fraction:g}).
- What encodes the label:
  - picture: a drawn face whose expression depends on the label: mouth curve and opening,
    eyebrow height and angle, eye opening (happy: smile; sad: down-turned mouth, raised inner
    brows; angry: lowered V-shaped brows, narrowed eyes; worried: raised, drawn-together brows;
    surprise: raised brows, wide eyes, open mouth; neutral: relaxed). The expression peaks at
    the frame given as `peak_index`; the mouth moves with the syllables of the voice.
  - sound: a voice-like harmonic tone whose pitch level and contour, speaking rate, loudness
    and brightness depend on the label (happy: high rise-fall; sad: low, falling, slow;
    angry: loud, bright, falling on each syllable; worried: trembling; surprise: upward leap).
  - the subtitle does NOT encode the label: sentences are drawn from one neutral pool.
- Files (MERR layout): `MERR_coarse_grained.txt` / `MERR_fine_grained.txt` (one clip a line:
  `name frame_count emotion valence`), `MERR_coarse_grained.json` (`caption`, `pseu_emotion`,
  `AU_list`, `visual_prior_list`, `audio_prior_list`, `peak_index`, `text`),
  `MERR_fine_grained.json` (`smp_reason_caption`, `pseu_emotion`, `text`),
  `transcription_en_all.csv` (`name,sentence`), `split.csv` (`name,split`).

License: CC0 1.0 (public domain dedication); generated data, free to use for any purpose.
"""


MARKER = ".emollama-sample.json"
FILES = ("MERR_coarse_grained.txt", "MERR_fine_grained.txt", "MERR_coarse_grained.json", "MERR_fine_grained.json",
         "transcription_en_all.csv", "split.csv", "README.md")


class SampleFolderError(ValueError):
    """The folder holds files of the user's that the sample would replace (or, without force, any)."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[str]:
    """Every file (and symlink) under ``root``, relative, as posix paths."""
    out = []
    for top, dirs, files in os.walk(root):
        rel = Path(top).relative_to(root)
        out += [(rel / n).as_posix() for n in files]
        out += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(top, d))]
    return sorted(out)


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def claim_folder(root: Path, planned: list[str], *, force: bool = False) -> list[str]:
    """The files of an earlier sample in ``root`` (to be removed before the new one is written);
    SampleFolderError when ``root`` holds anything else (with ``force``: when the sample would replace
    any of it). ``planned``: the relative paths the new sample writes."""
    if root.exists() and not root.is_dir():
        raise SampleFolderError(f"{root} is a file: choose a folder for the sample")
    if not root.is_dir():
        return []
    try:
        earlier = json.loads((root / MARKER).read_text())["files"] if (root / MARKER).is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        earlier = {}
    found = [f for f in _files(root) if f != MARKER]
    # a file the sample wrote and nobody changed since (None: its write was interrupted)
    ours = [f for f in found if f in earlier and (earlier[f] is None or _sha256(root / f) == earlier[f])]
    theirs = sorted(set(found) - set(ours))
    if theirs and not force:
        raise SampleFolderError(f"{root} holds files that are not an emollama sample ({_few(theirs)}): choose an empty "
                                "or new folder, or pass --force to write the sample beside them (a file of yours is "
                                "never replaced or deleted)")
    parents = {p.as_posix() for f in planned for p in Path(f).parents}
    clash = [f for f in theirs if f in planned or f in parents]
    if clash:
        raise SampleFolderError(f"the sample would replace files in {root} that it did not write ({_few(clash)}): "
                                "move them away or choose another folder")
    return ours


def write_sample(
    root: Path,
    clips: int = 24,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    fps: int = 25,
    seconds: float = 2.0,
    size: tuple[int, int] = (320, 240),
    force: bool = False,
) -> Path:
    """Write a synthetic labelled dataset in the MERR layout under ``root`` and return ``root``.

    Deterministic for a seed. ``size`` is (width, height); both must be even (yuv420p). ``root`` must
    be new, empty or an earlier sample (``force``: or hold files the sample does not replace); else
    SampleFolderError.
    """
    if clips < 1:
        raise ValueError(f"write_sample: clips must be >= 1, got {clips}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"write_sample: test_fraction must be in [0, 1), got {test_fraction}")
    w, h = size
    if w % 2 or h % 2 or w < 64 or h < 64:
        raise ValueError(f"write_sample: size must be even and at least 64x64, got {size}")
    root = Path(root)
    names = [f"sample_{i + 1:08d}" for i in range(clips)]
    planned = [f"video/{n}.mp4" for n in names] + list(FILES)
    for rel in claim_folder(root, planned, force=force):
        (root / rel).unlink()
    (root / "video").mkdir(parents=True, exist_ok=True)
    marker = {"seed": seed, "clips": clips, "files": dict.fromkeys(planned)}   # first: an interrupted write stays ours
    (root / MARKER).write_text(json.dumps(marker, indent=1))
    n_frames = max(1, int(round(fps * seconds)))
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(clips)]
    labels = [labels[i] for i in rng.permutation(clips)]

    # stratified split
    split = {}
    for lab in LABELS:
        members = [n for n, l in zip(names, labels) if l == lab]
        n_test = int(round(len(members) * test_fraction))
        if test_fraction > 0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test = set(rng.choice(members, size=n_test, replace=False).tolist()) if n_test else set()
        split.update({n: ("test" if n in test else "train") for n in members})

    coarse_json, fine_json, rows = {}, {}, []
    for i, (name, lab) in enumerate(zip(names, labels)):
        crng = np.random.default_rng([seed, i])
        audio, sylls = render_voice(lab, crng, seconds)
        t = (np.arange(n_frames) + 0.5) / fps
        talk = _envelope(sylls, t)
        peak = int(crng.integers(int(n_frames * 0.3), max(int(n_frames * 0.3) + 1, int(n_frames * 0.7))))
        frames = render_frames(lab, crng, n_frames, size, talk, peak)
        write_mp4(root / "video" / f"{name}.mp4", frames, fps, audio)
        text = SENTENCES[int(crng.integers(len(SENTENCES)))]
        coarse, fine = _captions(lab, text, crng)
        valence = VALENCE[lab] + float(crng.normal(0, 0.25))
        rows.append((name, n_frames, lab, valence, text))
        coarse_json[name] = {
            "caption": coarse, "pseu_emotion": lab, "AU_list": AU_LIST[lab],
            "visual_prior_list": VISUAL_CUES[lab], "audio_prior_list": AUDIO_CUES[lab],
            "peak_index": peak, "text": text,
        }
        fine_json[name] = {"smp_reason_caption": fine, "pseu_emotion": lab, "text": text}

    ncev = "".join(f"{n} {fc} {lab} {val:.6f}\n" for n, fc, lab, val, _ in rows)
    (root / "MERR_coarse_grained.txt").write_text(ncev)
    (root / "MERR_fine_grained.txt").write_text(ncev)
    (root / "MERR_coarse_grained.json").write_text(json.dumps(coarse_json, indent=1, ensure_ascii=False))
    (root / "MERR_fine_grained.json").write_text(json.dumps(fine_json, indent=1, ensure_ascii=False))
    with open(root / "transcription_en_all.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["name", "sentence"])
        wr.writerows((n, text) for n, _, _, _, text in rows)
    with open(root / "split.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["name", "split"])
        wr.writerows((n, split[n]) for n in names)
    (root / "README.md").write_text(_README.format(
        seed=seed, clips=clips, seconds=seconds, w=w, h=h, fps=fps, labels=", ".join(LABELS),
        test_fraction=test_fraction))
    marker["files"] = {rel: _sha256(root / rel) for rel in planned}
    (root / MARKER).write_text(json.dumps(marker, indent=1))
    log.info("wrote %d synthetic clips to %s", clips, root)
    return root

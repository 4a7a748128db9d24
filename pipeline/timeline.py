"""Emotion over time: a long video cut into windows, each window through a run like any clip, then a
CSV of every window's probabilities and a plot of them over time with the shot cuts marked.

    from emollama.pipeline.inference import Predictor
    from emollama.pipeline.timeline import TimelineSettings, run_timeline

    result = run_timeline(Predictor.from_run("runs/stage1"), "interview.mp4", TimelineSettings(window=4, hop=2))

The video is read twice as a stream (``extract.windows``): once for its shot cuts, once to write each
window as a clip of its own, in batches of ``batch`` windows that go through ``Predictor.predict`` and
are deleted; so memory and disk stay bounded for any length. A window's features go through the run's eval
store like any clip's: a rerun finds each window by its content and extracts nothing. With
``follow_cuts`` no window crosses a cut (each shot gets its own windows); the cuts are marked either way.
``emollama timeline`` is a thin layer over ``run_timeline``.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from emollama.extract.windows import Window, plan_windows, scan_cuts, write_windows


@dataclass
class TimelineSettings:
    window: float = 4.0           # seconds a window lasts
    hop: float = 2.0              # seconds between window starts
    follow_cuts: bool = True      # windows never cross a shot cut
    cut_distance: float = 0.2     # a cut: two frames' colour histograms this far apart (faces.cut_distance)
    scan_fps: float = 5.0         # frames a second compared for cuts
    max_side: int = 640           # the window clips' largest side
    batch: int = 8                # windows written, predicted and deleted at a time
    subtitle: str | None = None   # one text for every window (none by default)

    def problems(self) -> list[str]:
        out = []
        if self.window <= 0:
            out.append(f"--window {self.window:g}: must be positive")
        if self.hop <= 0:
            out.append(f"--hop {self.hop:g}: must be positive")
        if self.hop > self.window:
            out.append(f"--hop {self.hop:g} is longer than --window {self.window:g}: parts of the video would "
                       "be in no window")
        if not 0 < self.cut_distance <= 1:
            out.append(f"--cut-distance {self.cut_distance:g}: choose a value in (0, 1]")
        if self.batch < 1:
            out.append(f"--batch {self.batch}: at least 1")
        return out


@dataclass
class WindowResult:
    index: int
    start: float
    end: float
    shot: int
    label: str | None = None
    probabilities: dict[str, float] | None = None
    face_found: bool | None = None
    extracted: bool = False
    error: str | None = None

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


@dataclass
class TimelineResult:
    source: str
    duration: float
    cuts: list[float]
    windows: list[WindowResult]
    labels: list[str]
    settings: TimelineSettings
    skipped_shots: list[tuple[float, float]] = field(default_factory=list)   # too short for a window
    note: str | None = None       # the tiny profile's warning
    csv: str | None = None
    plot: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["settings"] = asdict(self.settings)
        return d


def run_timeline(predictor, source: str | Path, settings: TimelineSettings | None = None, *,
                 out: str | Path | None = None, say: Callable[[str], None] = lambda s: None,
                 progress: bool = False, shown: str | None = None) -> TimelineResult:
    """Every window of ``source`` through ``predictor``; the CSV, the plot and ``timeline.json`` go into
    ``out`` when given. ``shown``: the name the result and the plot give the video (default: its path)."""
    from tqdm.auto import tqdm

    from emollama.train.tiny import TINY_WARNING

    s = settings or TimelineSettings()
    source = Path(source)
    t0 = time.perf_counter()
    cuts, duration = scan_cuts(source, cut_distance=s.cut_distance, scan_fps=s.scan_fps)
    windows, short = plan_windows(duration, s.window, s.hop, cuts if s.follow_cuts else ())
    say(f"{source.name}: {duration:.1f} s, {len(cuts)} cut(s), {len(windows)} window(s) of {s.window:g} s "
        f"every {s.hop:g} s" + (" inside each shot" if s.follow_cuts else ""))
    results: dict[int, WindowResult] = {}
    tmp = Path(tempfile.mkdtemp(prefix="emollama-timeline-"))
    bar = tqdm(total=len(windows), desc="timeline", unit="window", disable=not progress, dynamic_ncols=True)
    try:
        pending: list[tuple[Window, Path]] = []
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in source.stem)[:40] or "video"
        for w, path in write_windows(source, windows, tmp, max_side=s.max_side, name=stem):
            pending.append((w, path))
            if len(pending) >= s.batch:
                _predict(predictor, pending, s, results)
                bar.update(len(pending))
                pending = []
        if pending:
            _predict(predictor, pending, s, results)
            bar.update(len(pending))
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result = TimelineResult(shown or str(source), round(duration, 3), cuts, [results[w.index] for w in windows],
                            list(predictor.labels), s, short,
                            TINY_WARNING if predictor.run.tiny else None)
    result.seconds = round(time.perf_counter() - t0, 2)
    if out is not None:
        write_outputs(result, Path(out))
    return result


def _predict(predictor, pending: list[tuple[Window, Path]], s: TimelineSettings, results: dict) -> None:
    preds = predictor.predict([str(p) for _, p in pending], subtitle=s.subtitle, reason=False)
    for (w, path), p in zip(pending, preds):
        results[w.index] = WindowResult(w.index, w.start, w.end, w.shot, p.label, p.probabilities,
                                        None if p.face is None else p.face.found, p.extracted, p.error)
        path.unlink(missing_ok=True)


def write_outputs(result: TimelineResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    labels = result.labels
    path = out / "timeline.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["window", "start", "end", "shot", "label", *[f"p_{l}" for l in labels], "face_found",
                    "extracted", "error"])
        for r in result.windows:
            probs = r.probabilities or {}
            w.writerow([r.index, f"{r.start:.3f}", f"{r.end:.3f}", r.shot, r.label or "",
                        *[f"{probs[l]:.6f}" if l in probs else "" for l in labels],
                        "" if r.face_found is None else int(r.face_found), int(r.extracted), r.error or ""])
    result.csv = str(path)
    result.plot = str(plot(result, out / "timeline.png"))
    (out / "timeline.json").write_text(json.dumps(result.to_dict(), indent=2))


def plot(result: TimelineResult, path: Path) -> Path:
    """Each label's probability at each window's centre, the windows' spans as a strip, the cuts as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    good = [r for r in result.windows if r.probabilities]
    # with windows inside each shot, a line never joins two shots
    shots = sorted({r.shot for r in good}) if result.settings.follow_cuts else [None]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(result.labels):
        for k, shot in enumerate(shots):
            part = [r for r in good if shot is None or r.shot == shot]
            ax.plot([r.centre for r in part], [r.probabilities[label] for r in part], marker="o", markersize=3,
                    linewidth=1.6, color=colours[i % len(colours)], label=label if k == 0 else None)
    for i, c in enumerate(result.cuts):
        ax.axvline(c, color="0.25", linestyle="--", linewidth=1, label="shot cut" if i == 0 else None)
    for r in result.windows:
        if r.error:
            ax.axvspan(r.start, r.end, color="red", alpha=0.08)
    ax.set_xlim(0, max(result.duration, 1e-3))
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    s = result.settings
    title = (f"{Path(result.source).name}: {len(result.windows)} windows of {s.window:g} s every {s.hop:g} s"
             + (" inside each shot" if s.follow_cuts else ""))
    if result.note:
        title += "\n(tiny profile: a random fixture, not a result)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

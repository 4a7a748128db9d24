"""`emollama timeline`: the CLI layer over pipeline.timeline (a long video's emotion over time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from emollama.pipeline.cli_eval import (DEVICE_OPTION, FEATURE_OPTION, OFFLINE_OPTION, RUN_OPTION,
                                       STORE_OPTION)


def register(app: typer.Typer) -> None:
    app.command("timeline")(timeline_cmd)


def timeline_cmd(
    video: Path = typer.Argument(..., help="A video file of any length."),
    run: Path = RUN_OPTION,
    window: float = typer.Option(4.0, "--window", help="Seconds a window lasts."),
    hop: float = typer.Option(2.0, "--hop", help="Seconds between window starts (at most --window)."),
    follow_cuts: bool = typer.Option(True, "--follow-cuts/--across-cuts", help="Windows inside each shot (default), "
                                     "or windows across shot cuts; the cuts are marked either way."),
    cut_distance: float = typer.Option(0.2, "--cut-distance", help="A cut: two frames' colour histograms this far "
                                       "apart (0-1, as the face tracker's faces.cut_distance)."),
    subtitle: Optional[str] = typer.Option(None, "--subtitle", help="One text for every window (default: none)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for timeline.csv, timeline.png and "
                                       "timeline.json (default: <run>/timeline/<video stem>-<12 hex of its sha256>)."),
    store: Optional[str] = STORE_OPTION,
    cache_store: Optional[str] = typer.Option(None, "--cache-store", help="Where the windows are extracted "
                                              "(default <run>/eval-store.zarr): a rerun reads them from it."),
    feature: Optional[List[str]] = FEATURE_OPTION,
    device: str = DEVICE_OPTION,
    offline: Optional[bool] = OFFLINE_OPTION,
    batch: int = typer.Option(8, "--batch", help="Windows written, predicted and deleted at a time."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="A progress bar (default: when stderr is a terminal)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Emotion over time: VIDEO cut into windows (--window seconds every --hop, inside each shot unless
    --across-cuts), each window through the run like any clip (its features go through the run's eval store,
    so a rerun extracts nothing), then a CSV of each window's probabilities and a PNG plot of them over time
    with the shot cuts marked. The video is decoded as a stream: memory stays bounded for any length."""
    from emollama.extract.decode import DecodeError
    from emollama.extract.sources import file_sha256
    from emollama.pipeline.cli_eval import _fail, _load_run, _progress, _user_errors
    from emollama.pipeline.features import run_stores
    from emollama.pipeline.inference import Predictor, not_a_clip
    from emollama.pipeline.timeline import TimelineSettings, run_timeline

    settings = TimelineSettings(window=window, hop=hop, follow_cuts=follow_cuts, cut_distance=cut_distance,
                                batch=batch, subtitle=subtitle)
    problems = settings.problems()
    if not video.is_file():
        problems.insert(0, f"no such file: {video}")
    elif (why := not_a_clip(video)) is not None:
        problems.insert(0, f"{video}: {why}")
    elif video.stat().st_size == 0:
        problems.insert(0, f"{video} is empty (0 bytes)")
    if problems:
        _fail(ValueError("; ".join(problems)))
    say = (lambda s: None) if as_json else (lambda s: typer.echo(s, err=True))
    loaded = _load_run(run, device, None, offline)
    if out is None:
        out = Path(run) / "timeline" / f"{video.stem}-{file_sha256(video)[:12]}"
    try:
        predictor = Predictor(loaded, run_stores(loaded, store, cache_store, list(feature or []), say), say=say)
        result = run_timeline(predictor, video, settings, out=out, say=say, progress=_progress(progress))
    except DecodeError as e:
        _fail(ValueError(f"{video}: {e}"))
    except _user_errors() as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.note:
        typer.echo("NOTE: " + result.note)
    failed = [w for w in result.windows if w.error]
    extracted = sum(w.extracted for w in result.windows)
    stored = len(result.windows) - extracted - len(failed)
    cuts = f" at {', '.join(f'{c:.1f}' for c in result.cuts[:8])} s" if result.cuts else ""
    typer.echo(f"{len(result.windows)} windows over {result.duration:.1f} s, {len(result.cuts)} cut(s){cuts}; "
               f"{extracted} extracted now, {stored} read from a store" + (f", {len(failed)} failed" if failed else ""))
    for w in failed[:5]:
        typer.echo(f"window {w.index} ({w.start:.1f}-{w.end:.1f} s): failed: {w.error}")
    for a, b in result.skipped_shots[:5]:
        typer.echo(f"shot {a:.2f}-{b:.2f} s: too short for a window")
    typer.echo(f"timeline: {result.csv}\nplot: {result.plot}")
    if failed:
        raise typer.Exit(1)

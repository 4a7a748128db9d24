"""The `emollama` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer


def on_terminal() -> bool:
    """Whether someone watches stderr: progress bars default to on there and to off in logs and pipes."""
    return sys.stderr.isatty()

# Plain help text: Rich markup would eat every "[...]" of it ([extract.encoders.*], [dataset]).
app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    help="emollama: multimodal emotion recognition with an instruction-tuned LLM, in two stages "
         "(extract frozen features once into a Zarr store; train projectors + LoRA over them).",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"emollama {version('emollama')}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging: -v info, -vv debug."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if verbose < 2:
        for noisy in ("distributed", "urllib3", "httpx", "huggingface_hub", "transformers", "timm"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
        # the libraries' own "Loading weights" bars (read when transformers is first imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.command()
def sample(
    folder: Path = typer.Argument(..., help="Where to write the dataset (created)."),
    clips: int = typer.Option(24, "--clips", "-n", min=2, help="Number of clips."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
    test_fraction: float = typer.Option(0.25, min=0.0, max=0.9, help="Share of clips in the test split."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that holds other files too (none of "
                               "them is replaced or deleted)."),
) -> None:
    """Write a small synthetic labelled dataset in the MERR layout (real mp4 files with a face and a
    voice-like sound, the label visible in both). The demo and the tests use it.

    FOLDER must be new, empty or an earlier sample (which is rewritten); a folder with other files is
    refused (exit 2) unless --force, and a file of yours is never replaced."""
    from emollama.extract.sample import SampleFolderError, write_sample

    try:
        root = write_sample(folder, clips=clips, seed=seed, test_fraction=test_fraction, force=force)
    except SampleFolderError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {clips} synthetic clips to {root} (MERR layout; see {root / 'README.md'})")


@app.command()
def extract(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="merr | mer2023 | dfew | folder | emer "
                                          "(`emollama datasets` lists them with their options)."),
    data: Optional[str] = typer.Option(None, "--data", help="The corpus folder."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="Feature store: a folder or an fsspec URL."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p",
                                          help="Encoders: paper (the default: hub ids / stand-ins, or the folders "
                                               "of the config's encoder tables) or tiny (random, local: tests "
                                               "and the demo only)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A TOML config file (see docs/config.md)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Local dask workers (default 0: in this process, the fastest with a GPU; on a CPU each process encodes on [extract] cpu_threads threads, default 1, so N workers use N cores)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing dask scheduler."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    local_frames: Optional[int] = typer.Option(None, "--frames", help="Face frames sampled per clip (local view)."),
    global_frame: Optional[str] = typer.Option(None, "--global-frame", help="first | middle | peak"),
    dtype: Optional[str] = typer.Option(None, help="Storage dtype: float16 (default) or float32."),
    missing_audio: Optional[str] = typer.Option(None, "--missing-audio",
                                                help="A clip without sound: fail, silence, or auto (silence "
                                                     "for frame folders such as DFEW, fail for videos)."),
    batch_clips: Optional[int] = typer.Option(None, "--batch-clips", help="Clips per task and store commit."),
    prep_workers: Optional[int] = typer.Option(None, "--prep-workers", "-P",
                                               help="Processes that decode and crop faces for each encoding worker "
                                                    "(default: its cores; 0: a thread)."),
    detect_on: Optional[str] = typer.Option(None, "--detect-on",
                                            help="Where MTCNN runs: prep (each clip on a preparation process's "
                                                 "CPU), encoder (a micro-batch at once on the encoders' device) "
                                                 "or auto (default: encoder on a GPU, else prep)."),
    fold: Optional[int] = typer.Option(None, help="DFEW fold (1-5)."),
    labels_csv: Optional[str] = typer.Option(None, "--labels-csv", help="folder: a CSV name,label,sentence."),
    option: Optional[List[str]] = typer.Option(
        None, "--option", help="A dataset option, KEY=VALUE (repeatable), e.g. frames_dir=Clip/clip_224x224_16f; "
                               "`emollama datasets` lists each dataset's options."),
    preview: Optional[str] = typer.Option(None, "--preview", help="Write a contact-sheet PNG per clip here."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels",
                                             help="Fail a clip whose frames are larger than this many pixels "
                                                  "(default 8192x8192)."),
    offline: Optional[bool] = typer.Option(None, "--offline/--online", help="Never/also ask the model hub."),
    asr: Optional[bool] = typer.Option(None, "--asr/--no-asr", help="Also write subtitles from speech: Whisper's "
                                       "text of each clip's audio, a text set ([extract.asr]; the paper profile: "
                                       "openai/whisper-large-v3, tiny: a random fixture whose text means nothing)."),
    asr_model: Optional[str] = typer.Option(None, "--asr-model", help="A Whisper hub id or local folder (implies "
                                            "--asr)."),
    asr_task: Optional[str] = typer.Option(None, "--asr-task", help="translate (English text, the default) or "
                                           "transcribe (the spoken language); implies --asr."),
    asr_language: Optional[str] = typer.Option(None, "--asr-language", help="Force the spoken language (a Whisper "
                                               "code: en, zh, ...; default: detected per clip); implies --asr."),
    storage_option: Optional[List[str]] = typer.Option(
        None, "--storage-option", help="fsspec option for the store, KEY=VALUE (repeatable), e.g. endpoint_url=..."),
    limit: Optional[int] = typer.Option(None, help="Only the first N clips (a quick look)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Show a progress bar (default: when stderr is a terminal)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Stage one: decode clips, find faces, run the frozen encoders (the four views, plus any named in
    [extract.encoders.*]), write the feature store; with --asr also each clip's speech as text (a text
    set the prompts take subtitles from where a clip has none).

    Reruns skip complete clips and retry failed ones. Exit status 1 when any clip failed, 2 for a
    configuration or usage error, 4 when the store cannot be written, 130 when interrupted."""
    from emollama.extract.prep import sleeping_idle_threads

    sleeping_idle_threads()   # before torch loads: idle encoder threads must not spin on the preparers' cores
    from emollama.corpora import parse_options
    from emollama.pipeline.config import ConfigError, load_config
    from emollama.pipeline.extraction import is_storage_error, parse_storage_options, run_extract

    overrides = {
        "dataset": {"kind": dataset, "root": data, "options": None},
        "extract": {"store": store, "profile": profile, "workers": workers, "scheduler": scheduler,
                    "device": device, "local_frames": local_frames, "global_frame": global_frame,
                    "dtype": dtype, "missing_audio": missing_audio, "batch_clips": batch_clips, "preview": preview, "offline": offline,
                    "prep_workers": prep_workers, "detect_on": detect_on, "asr_model": asr_model,
                    "asr_task": asr_task, "asr_language": asr_language,
                    "asr_enabled": asr if asr is not None or not (asr_model or asr_task or asr_language) else True},
    }
    if max_pixels is not None:
        overrides["extract"]["max_pixels"] = max_pixels
    try:   # the dataset's options, checked against its options dataclass when the corpus is read
        overrides["dataset"]["options"] = parse_options(option or [], fold=fold, labels_csv=labels_csv) or None
        if storage_option:
            overrides["extract"]["storage_options"] = parse_storage_options(storage_option)
        cfg = load_config(config, overrides)
    except (ConfigError, ValueError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    try:
        summary = run_extract(cfg, progress=on_terminal() if progress is None else progress, limit=limit)
    except KeyboardInterrupt:
        # whatever was committed stays; the rerun skips it. One line, no traceback.
        typer.echo("interrupted: rerun to resume", err=True)
        raise typer.Exit(130)
    except Exception as e:  # clear, short message for known user errors; traceback with -vv
        from emollama.extract.encoders import MissingWeightsError
        from emollama.extract.models import WeightsFileError
        from emollama.corpora import DatasetError

        if is_storage_error(e):   # one line (the store's StorageError says what happened and what to do)
            from emollama.store import StorageError

            if isinstance(e, StorageError):
                typer.echo(f"error: {e}", err=True)
            else:
                where = f": {e.filename}" if getattr(e, "filename", None) else ""
                typer.echo(f"error: storage error ({e.strerror or e}{where}): nothing committed was lost; free "
                           "space or make the store writable (or use another --store), then rerun", err=True)
            raise typer.Exit(4)
        if isinstance(e, (MissingWeightsError, WeightsFileError, DatasetError, FileNotFoundError, FileExistsError)):
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        raise
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in summary.lines():
            typer.echo(line)
    if summary.compact_error:
        typer.echo(f"error: every clip is committed, but the end-of-run compaction failed: {summary.compact_error}",
                   err=True)
    raise typer.Exit(summary.exit_code)


@app.command()
def datasets() -> None:
    """List the registered datasets: labels, splits and folds, whether their clips have sound, and
    their options (pass them to `extract` as --option KEY=VALUE, or in a config's [dataset] options)."""
    from emollama.corpora import ADAPTERS, describe

    for adapter in ADAPTERS.values():
        for line in describe(adapter):
            typer.echo(line)


# The other command groups live in their own modules.
from emollama.pipeline import cli_eval, cli_serve, cli_store, cli_timeline, cli_train  # noqa: E402

app.add_typer(cli_store.store_app, name="store", help="Inspect, verify, import, export and prune feature stores.")
cli_train.register(app)
cli_eval.register(app)
cli_serve.register(app)
cli_timeline.register(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`emollama train` and `emollama params`: stage two on the command line (``register(app)``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `train`, `params` and `import-checkpoint` commands to the main app."""
    app.command("train")(train_cmd)
    app.command("params")(params_cmd)
    app.command("import-checkpoint")(import_checkpoint_cmd)


def import_checkpoint_cmd(
    checkpoint: Path = typer.Argument(..., help="A released checkpoint: Emotion_LLaMA.pth, checkpoint_best.pth, "
                                      "MER2024-best.pth (torch.save of {'model': ...})."),
    out: Path = typer.Option(..., "--out", "-o", help="The run folder to write."),
    profile: str = typer.Option("paper", "--profile", "-p", help="paper (LLaMA-2-7B-chat) | tiny (tests)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="The base LM: a local folder (or hub id) of matching "
                                      "hidden size, e.g. your copy of Llama-2-7b-chat-hf."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print what was imported as JSON."),
) -> None:
    """Import a released Emotion-LLaMA checkpoint as a run folder that `eval`, `infer`, `params` and
    `train --init-from` accept: the LoRA adapter in PEFT's format, the five projectors in safetensors,
    a config with the emotion-llama prompt style, and the feature-set binding (at evaluation each of
    the run's four sets reads the store's set of the same modality and shape). Every key of the file
    is used, ignored with a reason, or reported; a tensor with NaN or Inf is refused. No LM weights are
    loaded. --out must be new or empty (or --overwrite its run). Exit status 2 for a checkpoint or
    folder that does not fit, 5 when another emollama process writes --out."""
    from emollama.train.checkpoint import CheckpointError
    from emollama.train.model import MissingModelError
    from emollama.train.released import import_checkpoint
    from emollama.train.runfolder import RunFolderBusy

    if profile not in ("paper", "tiny"):
        typer.echo(f"error: --profile {profile!r}: choose paper or tiny", err=True)
        raise typer.Exit(2)
    try:
        info = import_checkpoint(checkpoint, out, profile=profile, llm=llm or "", overwrite=overwrite)
    except RunFolderBusy as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(5)
    except (CheckpointError, MissingModelError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    typer.echo(f"imported {checkpoint} ({info['kind']}): {info['used']} tensors used "
               f"({len(info['projectors'])} projectors, {info['lora_tensors']} LoRA tensors), "
               f"{len(info['ignored'])} ignored")
    for why in sorted(set(info["ignored"].values())):
        n = sum(1 for v in info["ignored"].values() if v == why)
        typer.echo(f"  ignored {n}: {why}")
    typer.echo(f"run folder: {out}  (prompt style emotion-llama; evaluate with "
               f"`emollama eval --run {out} --dataset mer2023 --data DIR --store STORE`)")


def train_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A training TOML (configs/stage1.toml ...)."),
    data: Optional[str] = typer.Option(None, "--data", help="The corpus folder (data.root)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Any dataset `emollama datasets` lists "
                                          "(merr, mer2023, dfew, folder, ...)."),
    labels_csv: Optional[str] = typer.Option(None, "--labels-csv", help="folder: a CSV name,label[,sentence,split] "
                                             "(the labels of your own videos)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="A dataset option KEY=VALUE (repeatable; "
                                               "`emollama datasets` lists them), e.g. fold=2."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="The feature store of stage one."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The run folder."),
    features: Optional[List[str]] = typer.Option(None, "--feature", "-f",
                                                 help="A feature set to feed (repeat; e.g. -f audio.hubert.mean "
                                                      "for audio only). Default: the config's."),
    tasks: Optional[List[str]] = typer.Option(None, "--task", help="emotion | reason | reason_v2 (repeat)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="tiny (random fixture) | paper (LLaMA-2-7B-chat)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="The language model: a hub id or a local folder."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from this run's adapter + projectors."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Scheduled optimizer steps (0: epochs x steps/epoch)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Per process and micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this step (the schedule is unchanged)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's newest checkpoint "
                                "(with the run's own settings)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out: its checkpoints, "
                                   "TensorBoard log, metrics and eval reports are removed first."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Show a progress bar (default: when stderr is a terminal)."),
    offline: Optional[bool] = typer.Option(None, "--offline/--online",
                                           help="Never/also ask the model hub for the LM (default: HF_HUB_OFFLINE)."),
    subtitle_source: Optional[str] = typer.Option(None, "--subtitle-source", help="data.subtitles: dataset | asr "
                                                  "(the store's ASR text set, `extract --asr`) | dataset-then-asr "
                                                  "(the default: the dataset's, else the ASR text)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON."),
) -> None:
    """Stage two: train the projectors and the LoRA adapter over the feature store.

    --out must be new or empty, or hold a run that --resume continues or --overwrite replaces. Under
    torchrun every process runs this same command (DDP; rank 0 writes the run folder). Without a
    progress bar, a loss line goes to stderr every run.log_every steps. Ctrl-C stops after the current
    step with a checkpoint of it (`--resume` continues exactly).

    Exit status: 2 a configuration error, 3 the loss diverged, 4 the run folder cannot be written
    (disk full, read-only): the last complete checkpoint is kept and `--resume` continues from it;
    5 another emollama process writes --out; 130 interrupted."""
    from emollama.corpora import DatasetError, parse_options
    from emollama.store import StorageError, UnknownSetError
    from emollama.train.checkpoint import CheckpointError, CheckpointWriteError, run_write_failed, write_failure
    from emollama.train.config import TrainConfigError, TrainSetupError, data_from_run, load_train_config, read_toml
    from emollama.train.loop import TrainingDiverged, TrainingInterrupted, train
    from emollama.train.model import MissingModelError
    from emollama.train.chat_prompt import ChatTemplateError
    from emollama.train.run import RunError
    from emollama.train.runfolder import RunFolderBusy, RunFolderError

    try:
        options = parse_options(option or [], labels_csv=labels_csv) or None
    except DatasetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    overrides = {
        "data": {"root": data, "dataset": dataset, "store": store, "features": list(features) if features else None,
                 "tasks": list(tasks) if tasks else None, "options": options, "subtitles": subtitle_source},
        "model": {"profile": profile, "llm": llm, "gradient_checkpointing": gradient_checkpointing, "offline": offline},
        "optim": {"lr": lr, "epochs": epochs, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum},
        "run": {"out": out, "init_from": init_from, "seed": seed, "device": device},
    }
    try:
        # the data of the run this one continues (--resume) or starts from (--init-from), where not given
        given = read_toml(config, overrides, TrainConfigError, [])   # a peek: load_train_config lists problems
        lender = given.get("run", {}).get("out" if resume else "init_from")
        lent = data_from_run(lender) if lender else {}
        mine = given.get("data", {})
        if "root" not in lent or "dataset" in mine or "root" in mine:   # the corpus is lent whole, or not at all
            lent = {k: v for k, v in lent.items() if k == "store"}
        cfg = load_train_config(config, overrides, defaults={"data": lent})
    except TrainConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    try:
        from emollama.pipeline.cli import on_terminal
        from emollama.pipeline.models import check_models

        check_models(llm=cfg)   # the LM checked before the run folder exists (all missing models in one message)
        show = on_terminal() if progress is None else progress  # bars only where someone watches
        result = train(cfg, resume=resume, overwrite=overwrite, max_steps=max_steps, progress=show,
                       echo=(lambda s: None) if as_json else typer.echo, losses=lambda s: typer.echo(s, err=True))
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130)
    except KeyboardInterrupt:   # outside the steps (loading, the final evaluation): --resume takes it from there
        from emollama.train.checkpoint import latest_checkpoint

        last = latest_checkpoint(Path(cfg.run.out))
        typer.echo("interrupted: rerun with --resume" + (f" (it continues from {last})" if last else ""), err=True)
        raise typer.Exit(130)
    except RunFolderBusy as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(5)
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3)
    except CheckpointWriteError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(4)
    except (MissingModelError, DatasetError, CheckpointError, TrainSetupError, UnknownSetError, ChatTemplateError,
            RunError, RunFolderError, FileNotFoundError) as e:   # what the user can fix; else a bug: its traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except StorageError as e:   # one line of its own: e.g. the model cache (EMOLLAMA_HOME) is read-only
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(4)
    except OSError as e:
        if not run_write_failed(e, Path(cfg.run.out)):
            raise
        # any other write into the run folder (config, metrics, loss curve, TensorBoard) that failed
        what = Path(e.filename).name if getattr(e, "filename", None) else "a file"
        typer.echo(f"error: {write_failure(Path(cfg.run.out), what, e)}", err=True)
        raise typer.Exit(4)
    if as_json:
        m = {k: v for k, v in result.metrics.items() if k != "predictions"}
        typer.echo(json.dumps({"run": str(result.run), "step": result.step, "metrics": m,
                               "params": result.params}, indent=2, default=str))
    else:
        typer.echo(f"run folder: {result.run}  (step {result.step}, {result.seconds:.1f} s)")


def params_cmd(
    profile: str = typer.Option("paper", "--profile", "-p", help="paper (LLaMA-2-7B shapes) | tiny"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A training TOML (LoRA, features)."),
    store: Optional[str] = typer.Option(None, "--store", "-s",
                                        help="Take the projector input sizes from this store's feature sets "
                                             "(default: the paper's encoders: EVA 1025x1408, 1024 for the rest)."),
    features: Optional[List[str]] = typer.Option(None, "--feature", "-f", help="Feature sets (repeat)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Count a run folder (trained or imported) instead."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Trainable parameters of each part (LoRA, each projector), the total and PEFT's percentage.

    The paper profile is built on the meta device: no weights are downloaded or allocated."""
    from emollama.store import UnknownSetError
    from emollama.train.checkpoint import CheckpointError
    from emollama.train.config import TrainConfigError, TrainSetupError
    from emollama.train.params import count_for_profile, count_for_run
    from emollama.train.run import RunError

    try:
        if run is not None:
            counts = count_for_run(run)
        else:
            counts = count_for_profile(profile, config=config, store=store,
                                       features=list(features) if features else None)
    except (TrainConfigError, TrainSetupError, UnknownSetError, CheckpointError, FileNotFoundError, RunError,
            OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(counts, indent=2))
        return
    from emollama.train.model import format_parameters

    for line in format_parameters(counts, counts.get("note", "")):
        typer.echo(line)

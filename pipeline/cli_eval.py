"""`emollama eval`, `infer` and `score` on the command line: thin layers over `pipeline.evaluation`,
`pipeline.inference` and `train.scoring`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from emollama.corpora import ADAPTERS, DFEW_FOLDS

LABEL_SETS = {name: a.labels for name, a in ADAPTERS.items() if a.labels}   # the datasets' declared label sets


def register(app: typer.Typer) -> None:
    @app.command()
    def score(
        pred: Path = typer.Option(..., "--pred", exists=True, dir_okay=False,
                                  help="CSV with columns name,label,prediction (a label or a free-text answer)."),
        dataset: str = typer.Option("mer2023", "--dataset", help="Label set: mer2023 | merr | dfew."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label set (overrides --dataset)."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ) -> None:
        """Score a predictions file: accuracy (WAR), weighted F1, macro F1, UAR, per-class scores and
        the confusion matrix. Answers naming no label of the set are counted and listed, never mapped."""
        from emollama.train.scoring import classification_metrics, read_predictions

        if labels:
            label_set = tuple(x.strip().lower() for x in labels.split(",") if x.strip())
        elif dataset in LABEL_SETS:
            label_set = LABEL_SETS[dataset]
        else:
            typer.echo(f"error: unknown --dataset {dataset!r}; use {', '.join(LABEL_SETS)} or --labels", err=True)
            raise typer.Exit(2)
        try:
            ids, truth, parsed, raw = read_predictions(pred, labels=label_set)
        except ValueError as e:
            typer.echo(f"error: {pred}: {e}", err=True)
            raise typer.Exit(2)
        m = classification_metrics(truth, parsed, label_set, ids=ids)
        m.unparsed = [(cid, raw[ids.index(cid)]) for cid, _ in m.unparsed]
        if as_json:
            typer.echo(json.dumps(m.to_dict(), indent=2))
        else:
            typer.echo(m.table())
            for cid, answer in m.unparsed[:10]:
                typer.echo(f"outside the label set: {cid}: {answer!r}")

    app.command("eval")(eval_cmd)
    app.command("infer")(infer_cmd)


def _fail(e: Exception, code: int = 2) -> None:
    from emollama.pipeline.features import EvalStorageError
    from emollama.train.runfolder import RunFolderBusy

    if isinstance(e, EvalStorageError):
        code = 4          # a storage error: the eval store cannot be written
    elif isinstance(e, RunFolderBusy):
        code = 5          # another eval writes the same report folder
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What eval and infer print as one line (exit 2): everything a user can fix; the rest is a bug."""
    from emollama.corpora import DatasetError
    from emollama.pipeline.features import EvalError
    from emollama.train.checkpoint import CheckpointError
    from emollama.train.emer import JudgeError
    from emollama.train.model import MissingModelError
    from emollama.train.chat_prompt import ChatTemplateError
    from emollama.train.run import RunError
    from emollama.train.runfolder import RunFolderError

    return (EvalError, RunError, RunFolderError, DatasetError, CheckpointError, MissingModelError, JudgeError,
            ChatTemplateError, FileNotFoundError, KeyError)


CACHE_HELP = ("Where clips missing from the training store are extracted (default: <run>/eval-store.zarr). "
              "The training store (--store, default the run's) is only read, never written; reruns reuse "
              "what this store holds.")

# The options of the commands that read a run (infer, serve, timeline): declared once, used by each
RUN_OPTION = typer.Option(..., "--run", help="A run folder (the --out of `emollama train` or `import-checkpoint`).")
STORE_OPTION = typer.Option(None, "--store", "-s", help="Feature store to read (default: the run's); never written.")
FEATURE_OPTION = typer.Option(None, "--feature", help="ROLE=SET for an imported run (repeat).")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
OFFLINE_OPTION = typer.Option(None, "--offline/--online", help="Never/also ask the model hub (default: "
                              "HF_HUB_OFFLINE decides).")
# subtitles from speech (pipeline.subtitles): eval and infer
SUBTITLE_SOURCE_OPTION = typer.Option(None, "--subtitle-source", help="dataset | asr | dataset-then-asr: the "
                                      "dataset's (or given) subtitles, the ASR text set's, or the first a clip has "
                                      "(default: the run's data.subtitles).")
ASR_OPTION = typer.Option(False, "--asr/--no-asr", help="Transcribe the clips the ASR text set lacks (Whisper, "
                          "[extract.asr]) into the eval store; a text set with recorded settings is extended anyway.")
ASR_SET_OPTION = typer.Option(None, "--asr-set", help="The ASR text set to read (name or key; default: the run's, "
                              "else the store's one).")


def _progress(progress: Optional[bool]) -> bool:
    from emollama.pipeline.cli import on_terminal

    return on_terminal() if progress is None else progress


def _dataset_options(option: Optional[List[str]], labels_csv: Optional[str]) -> Optional[dict]:
    """--option KEY=VALUE items and --labels-csv as a dataset's options (None: none given, the run's stay)."""
    from emollama.corpora import parse_options

    opts = parse_options(option or [], labels_csv=labels_csv)
    return opts or None


def eval_cmd(
    run: Path = typer.Option(..., "--run", help="A run folder (the --out of `emollama train` or `import-checkpoint`)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Any dataset `emollama datasets` lists "
                                          "(mer2023, merr, dfew, folder, emer, ...); default: the run's."),
    data: Optional[str] = typer.Option(None, "--data", help="The corpus folder (emer: the CSV name,chinese,english "
                                       "or its folder); default: the run's."),
    labels_csv: Optional[str] = typer.Option(None, "--labels-csv", help="folder: a CSV name,label[,sentence,split] "
                                             "(the labels of your own videos)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="A dataset option KEY=VALUE (repeatable; "
                                               "`emollama datasets` lists them); default: the run's."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="Feature store to read (default: the run's); "
                                        "never written."),
    cache_store: Optional[str] = typer.Option(None, "--cache-store", help=CACHE_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="The split to evaluate, or `all` (default: test where "
                                        "the dataset has it, else every labelled clip)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="DFEW fold 1-5."),
    all_folds: bool = typer.Option(False, "--all-folds", help="DFEW: each of the five folds, then their mean."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N labelled clips of the split "
                                        "(reported in its own folder)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label set to evaluate over "
                                         "(default: the corpus labels the run knows or the clips carry)."),
    label_map: Optional[List[str]] = typer.Option(None, "--label-map", help="FROM=TO: the model's label FROM counts "
                                                  "as the dataset's TO (repeat; e.g. worried=fear)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Generated tokens for the emotion answer."),
    reason_tokens: int = typer.Option(96, "--reason-tokens", help="Generated tokens for EMER reasoning texts."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Clips per forward pass."),
    workers: int = typer.Option(0, "--workers", "-w", help="Extraction of missing clips: 0 = in this process."),
    extract: bool = typer.Option(True, "--extract/--no-extract", help="Extract clips missing from the store "
                                 "(into --cache-store)."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Also generate answers and parse them."),
    out: Optional[Path] = typer.Option(None, "--out", help="Reports here instead of <run>/eval/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report of another scope (dataset, split, "
                                   "limit, labels, ...) in the report folder."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    llm: Optional[str] = typer.Option(None, "--llm", help="The base LM (a local folder or hub id) instead of the "
                                      "run's: e.g. your copy of Llama-2-7b-chat-hf for an imported run."),
    offline: Optional[bool] = typer.Option(None, "--offline/--online", help="Never/also ask the model hub "
                                           "(default: HF_HUB_OFFLINE decides)."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="EMER judge: OpenAI-compatible base URL "
                                            "(env EMOLLAMA_JUDGE_URL)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="EMER judge model (env EMOLLAMA_JUDGE_MODEL)."),
    layout: str = typer.Option("trained", "--layout", help="trained (the prompt as trained) | public-eval (the "
                               "public evaluation script's: all feature embeddings at <video>; emotion-llama runs)."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", help="ROLE=SET: which store set feeds an imported "
                                                "run's ROLE (local, temporal, audio, global) where several could."),
    missing_audio: Optional[str] = typer.Option(None, "--missing-audio", help="A clip without sound: fail, silence "
                                                "(one second of silence is encoded) or auto; default: as the run's "
                                                "sets were extracted."),
    conditions: bool = typer.Option(False, "--conditions", help="A robustness report: the same clips under each "
                                    "condition (each modality dropped, the face, the voice, both; audio noise at 10 "
                                    "and 0 dB; faces blurred; no subtitle), into <report>-conditions/."),
    condition: Optional[List[str]] = typer.Option(None, "--condition", help="One condition instead of the default "
                                                  "ones (repeat; implies --conditions): full | drop:M[+M...] (a "
                                                  "modality, face, voice, each) | noise[:SNR_DB] | blur[:FRACTION] | "
                                                  "no-subtitle."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Progress bars (default: when stderr is a terminal)."),
    subtitle_source: Optional[str] = SUBTITLE_SOURCE_OPTION,
    asr: bool = ASR_OPTION,
    asr_set: Optional[str] = ASR_SET_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Evaluate a run on any dataset: MER2023 / MERR / a folder of your own labelled videos (weighted F1,
    accuracy, per class, confusion matrix), DFEW (UAR and WAR per fold and averaged), EMER (Clue / Label
    Overlap by an LLM judge, else a lexical proxy). Labels come three ways: closed set (label
    likelihoods), the parsed generated answer, and the public scorer on the generated answer (last word;
    outside the labels -> neutral). Reports go to <run>/eval/<dataset>[-fold<k>][-<split>][-first<N>]/
    (metrics.json, report.md, figures, predictions). Clips missing from the run's store are extracted with
    the settings of its feature sets into --cache-store (default <run>/eval-store.zarr); the run's store
    is only read. With --conditions (or --condition), a robustness report instead: metrics per condition,
    a table and a bar plot (noise and blur are extracted into the eval store once, keyed by the condition).
    Exit status 2 for a usage error, 4 when the eval store cannot be written."""
    from emollama.corpora import DFEW_FOLDS, DatasetError
    from emollama.pipeline.evaluation import EvalOptions, evaluate

    if fold is not None and all_folds:
        _fail(ValueError("--fold and --all-folds exclude each other"))
    if fold is not None and fold not in DFEW_FOLDS:
        _fail(ValueError(f"--fold {fold}: DFEW folds are 1..5"))
    if dataset is not None and dataset in ADAPTERS and ADAPTERS[dataset].folds and fold is None and not all_folds:
        fold = ADAPTERS[dataset].folds[0]
    try:
        options = _dataset_options(option, labels_csv)
    except DatasetError as e:
        _fail(e)
    opts = EvalOptions(run=str(run), dataset=dataset, data=data, store=store, split=split, fold=fold, limit=limit,
                       options=options, labels=[x for x in labels.split(",") if x.strip()] if labels else None,
                       label_map=list(label_map or []), max_new_tokens=max_new_tokens, reason_tokens=reason_tokens,
                       batch_size=batch_size, workers=workers, extract=extract, generate=generate,
                       out=str(out) if out else None, overwrite=overwrite, device=device,
                       progress=_progress(progress), judge_url=judge_url, judge_model=judge_model, layout=layout,
                       features=list(feature or []), cache_store=cache_store, missing_audio=missing_audio,
                       offline=offline, subtitles=subtitle_source, asr=asr, asr_set=asr_set,
                       conditions=list(condition or []) if conditions or condition else None)
    say = (lambda s: None) if as_json else typer.echo
    try:
        res = evaluate(opts, say=say, run=_load_run(run, device, llm, offline))
    except _user_errors() as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(res, indent=2, default=str))


def _load_run(run: Path, device: str, llm: Optional[str], offline: Optional[bool]):
    """The run folder loaded quietly (no library loading bars), with ``llm`` instead of its LM if given;
    its LM checked first (one message lists what is missing, before anything is created)."""
    from emollama.pipeline.inference import quiet_loading
    from emollama.pipeline.models import check_run_models
    from emollama.train.run import load_run, read_run

    try:
        cfg, _, _ = read_run(Path(run))
        if llm:
            cfg.model.llm = llm
        check_run_models(cfg, offline=offline)
        with quiet_loading():
            return load_run(run, device=device, llm=llm, offline=offline)
    except _user_errors() as e:
        _fail(e)


def infer_cmd(
    clips: List[Path] = typer.Argument(..., help="Video files, frame folders, folders of videos (searched "
                                       "recursively) and list files (.txt: one path a line)."),
    run: Path = RUN_OPTION,
    store: Optional[str] = STORE_OPTION,
    cache_store: Optional[str] = typer.Option(None, "--cache-store", help=CACHE_HELP),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label set (default: the run's)."),
    subtitles: Optional[Path] = typer.Option(None, "--subtitles", help="A CSV name,sentence: what each person says "
                                             "(name: the clip id, its relative path or its file name)."),
    subtitle: Optional[str] = typer.Option(None, "--subtitle", help="What the person says (the same for every clip)."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Tokens of the reasoning text."),
    reason: bool = typer.Option(True, "--reason/--no-reason", help="Generate the reasoning text."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Clips per forward pass."),
    workers: int = typer.Option(0, "--workers", "-w", help="Extraction: 0 = in this process."),
    device: str = DEVICE_OPTION,
    llm: Optional[str] = typer.Option(None, "--llm", help="The base LM (a local folder or hub id) instead of the run's."),
    offline: Optional[bool] = OFFLINE_OPTION,
    layout: str = typer.Option("trained", "--layout", help="trained | public-eval (see `emollama eval --help`)."),
    feature: Optional[List[str]] = FEATURE_OPTION,
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write each clip's contact sheet (face crops, "
                                           "then the global frame) into this folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the results to FILE.csv or FILE.jsonl."),
    missing_audio: Optional[str] = typer.Option(None, "--missing-audio", help="A clip without sound: fail, silence "
                                                "(one second of silence is encoded) or auto; default: as the run's "
                                                "sets were extracted."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Progress bars (default: when stderr is a terminal)."),
    subtitle_source: Optional[str] = SUBTITLE_SOURCE_OPTION,
    asr: bool = ASR_OPTION,
    asr_set: Optional[str] = ASR_SET_OPTION,
    asr_task: Optional[str] = typer.Option(None, "--asr-task", help="translate (English) | transcribe (the spoken "
                                           "language): the ASR text set to read or make (implies --asr)."),
    asr_language: Optional[str] = typer.Option(None, "--asr-language", help="Force the spoken language (a Whisper "
                                               "code; default: detected); implies --asr."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Label, probability of every label, reasoning text and face information for any videos, through
    exactly the features the run was trained on: a clip a store already holds (found by its content) is
    read, any other is extracted with the run's feature-set settings into --cache-store (default
    <run>/eval-store.zarr; the run's store is only read). A clip with no face or a weak face track gets a
    warning line. A clip without a subtitle (--subtitle, --subtitles) gets its ASR text where a text set holds
    it (--asr transcribes the clips it lacks; the output shows the text used and where it came from). Exit status 1 when any clip failed, 2 for a usage error, 4 when the eval store cannot be
    written."""
    from emollama.pipeline.inference import Predictor, table_lines, write_predictions

    if out is not None and out.suffix.lower() not in (".csv", ".jsonl"):
        _fail(ValueError(f"--out {out}: write a .csv or a .jsonl file"))
    say = (lambda s: None) if as_json else (lambda s: typer.echo(s, err=True))
    loaded = _load_run(run, device, llm, offline)
    try:
        from emollama.pipeline.features import run_stores

        predictor = Predictor(loaded, run_stores(loaded, store, cache_store, list(feature or []), say),
                              layout=layout, say=say)
        results = predictor.predict(clips, subtitles=subtitles, subtitle=subtitle,
                                    labels=[x for x in labels.split(",") if x.strip()] if labels else None,
                                    reason=reason, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    workers=workers, progress=_progress(progress), preview=preview,
                                    missing_audio=missing_audio, offline=offline, subtitle_source=subtitle_source,
                                    asr=asr, asr_set=asr_set, asr_task=asr_task, asr_language=asr_language)
        if out is not None:
            written = write_predictions(results, out, predictor.run.labels if not labels else
                                        [x.strip().lower() for x in labels.split(",") if x.strip()])
    except _user_errors() as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        if loaded.tiny:
            from emollama.train.tiny import TINY_WARNING

            typer.echo("NOTE: " + TINY_WARNING)
        for line in table_lines(results):
            typer.echo(line)
        if predictor.skipped:
            typer.echo(f"skipped {len(predictor.skipped)} file(s) that are no videos: "
                       + ", ".join(f"{Path(f).name} ({why})" for f, why in predictor.skipped[:5])
                       + (" ..." if len(predictor.skipped) > 5 else ""))
        if out is not None:
            typer.echo(f"results: {written}")
    if any(r.error for r in results):
        raise typer.Exit(1)

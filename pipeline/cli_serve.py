"""`emollama serve`: the CLI layer over pipeline.serve (options, the run loaded once, one-line errors)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import List, Optional

import typer

from emollama.pipeline.cli_eval import (DEVICE_OPTION, FEATURE_OPTION, OFFLINE_OPTION, RUN_OPTION,
                                       STORE_OPTION)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)


def serve_cmd(
    run: Path = RUN_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    token: Optional[str] = typer.Option(None, "--token", help="Require 'Authorization: Bearer TOKEN' on every API "
                                        "endpoint (default: the EMOLLAMA_SERVE_TOKEN environment variable, else none)."),
    allow_dir: Optional[Path] = typer.Option(None, "--allow-dir", help="Accept server-side paths (form field 'path') "
                                             "under this folder, never outside it (default: none, uploads only)."),
    max_upload_mb: float = typer.Option(200.0, "--max-upload-mb", help="Larger uploads get 413."),
    cors: Optional[List[str]] = typer.Option(None, "--cors", help="Allow this browser origin (repeat; default: CORS off)."),
    store: Optional[str] = STORE_OPTION,
    cache_store: Optional[str] = typer.Option(None, "--cache-store", help="Where new clips are extracted (default "
                                              "<run>/eval-store.zarr): a clip sent again is read from it."),
    feature: Optional[List[str]] = FEATURE_OPTION,
    device: str = DEVICE_OPTION,
    offline: Optional[bool] = OFFLINE_OPTION,
    batch_max: int = typer.Option(8, "--batch-max", help="At most this many waiting clips go through the model together."),
    batch_wait_ms: float = typer.Option(50.0, "--batch-wait-ms", help="How long a request waits for others to join its batch."),
    reason: bool = typer.Option(True, "--reason/--no-reason", help="Generate the reasoning text."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Tokens of the reasoning text."),
    missing_audio: Optional[str] = typer.Option(None, "--missing-audio", help="A clip without sound: fail, silence or "
                                                "auto (default: as the run's sets were extracted)."),
) -> None:
    """Serve a run over HTTP: POST /v1/predict (a video upload, optional subtitle) answers what `infer --json`
    does, plus the face information and a contact-sheet URL; GET /v1/health, /v1/run; OpenAPI docs at /docs;
    a web page at /. The model is loaded once; waiting requests are batched; features go into the run's eval
    store, so a clip sent again answers without extraction."""
    from emollama.pipeline.cli_eval import _fail, _user_errors
    from emollama.pipeline.serve import TOKEN_ENV, ServeSettings, load_service, serve

    problems = []
    if not 0 < port < 65536:
        problems.append(f"--port {port}: choose 1-65535")
    if max_upload_mb <= 0:
        problems.append(f"--max-upload-mb {max_upload_mb:g}: must be positive")
    if batch_max < 1:
        problems.append(f"--batch-max {batch_max}: at least 1")
    if allow_dir is not None and not allow_dir.is_dir():
        problems.append(f"--allow-dir {allow_dir}: not a folder")
    if problems:
        _fail(ValueError("; ".join(problems)))
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    settings = ServeSettings(run=str(run), host=host, port=port, token=token,
                             allow_dir=str(allow_dir) if allow_dir else None, max_upload_mb=max_upload_mb,
                             cors=tuple(cors or ()), batch_max=batch_max, batch_wait_s=batch_wait_ms / 1000,
                             reason=reason, max_new_tokens=max_new_tokens, missing_audio=missing_audio)
    try:
        service = load_service(settings, store=store, cache_store=cache_store, device=device, offline=offline,
                               features=list(feature or []))
    except _user_errors() as e:
        _fail(e)
    if not _loopback(host) and token is None:
        typer.echo(f"WARNING: serving on {host} without a token: anyone who can reach it may use it "
                   "(--token or EMOLLAMA_SERVE_TOKEN)", err=True)
    if service.note:
        typer.echo("NOTE: " + service.note, err=True)
    typer.echo(f"serving run {service.predictor.run.name} on http://{host}:{port}/ (API docs: /docs"
               + ("; a bearer token is required" if token else "") + "); Ctrl-C stops", err=True)
    serve(service)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

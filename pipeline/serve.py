"""``emollama serve``: a run loaded once behind an HTTP API and a web page.

FastAPI on uvicorn: the standard ASGI pair. FastAPI gives the OpenAPI schema and ``/docs`` from the
endpoint signatures, and its multipart parsing streams uploads to disk; uvicorn serves it in one process.
The model stays in that process, so every request reuses it. The page is a single HTML document the app
serves (``pipeline.serve_page``): no front-end build step, no Gradio to pin.

- ``POST /v1/predict``: a video upload (multipart ``file``) with an optional ``subtitle``, or a server-side
  ``path`` under ``allow_dir``. The answer is ``emollama infer --json``'s for that clip, plus its sha256 and
  ``sheet_url``, the clip's contact sheet.
- ``POST /v1/timeline``: a video of any length (``emollama timeline``): each window's label and probabilities,
  the shot cuts, and the URLs of the plot and the CSV (``GET /v1/timelines/NAME/timeline.png``).
- ``GET /v1/health``, ``GET /v1/run`` (labels, profile, feature sets, prompt style), ``GET /v1/sheets/NAME``.
- ``/docs``: the OpenAPI page; ``/``: the web page.

Requests are queued and batched (``Batcher``): one thread owns the ``Predictor``; it takes the first waiting
request, gathers more for up to ``batch_wait_s`` (at most ``batch_max``), and sends them through the model
together. Features go through the run's eval store like ``infer``'s, so a clip sent again (same sha256)
is read, not extracted.

Safe by default: it binds to 127.0.0.1; ``token`` (or ``EMOLLAMA_SERVE_TOKEN``) requires
``Authorization: Bearer TOKEN`` on every API endpoint (the page and the schema are static: the page asks
for the token and sends it); uploads over ``max_upload_mb`` get 413 before they are stored; a file that
is not a usable video gets 422 with the reason; uploads are removed as soon as they are answered, and the
upload folder when the server stops; CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import hmac
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from emollama.pipeline.serve_page import PAGE

log = logging.getLogger(__name__)

TOKEN_ENV = "EMOLLAMA_SERVE_TOKEN"
# the content types an upload may declare: any video, the generic binary type, and GIF (a video to FFmpeg)
VIDEO_TYPES = ("video/", "application/octet-stream", "image/gif")
CHUNK = 1 << 20


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a reason for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class ServeSettings:
    """How ``emollama serve`` runs (its options)."""

    run: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None                 # None: EMOLLAMA_SERVE_TOKEN, else no token
    allow_dir: str | None = None             # server-side paths accepted under this folder only (None: none)
    max_upload_mb: float = 200.0
    cors: tuple[str, ...] = ()               # allowed origins (none: CORS off)
    batch_max: int = 8                       # clips through the model together
    batch_wait_s: float = 0.05               # how long the first request of a batch waits for others
    reason: bool = True                      # generate the reasoning text
    max_new_tokens: int = 96
    missing_audio: str | None = None         # a clip without sound (default: as the run's sets were made)
    upload_dir: str | None = None            # where uploads are kept while answered (default: the system's temp)
    sheets_dir: str | None = None            # contact sheets (default: <run>/serve/sheets)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Job:
    """One request waiting for the model."""

    path: Path                       # the clip (an upload, or a server-side path)
    sha256: str | None
    subtitle: str | None
    sheet: bool = True               # make its contact sheet (a clip read from a store has none until asked)
    future: cf.Future = field(default_factory=cf.Future)
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """One thread owns ``predict``; requests wait in a queue and go through it in batches.

    ``predict(paths, subtitles, sheets)`` gets unique paths, {file stem: subtitle} and whether any of them
    wants its contact sheet; two requests for one clip
    (the same sha256 and subtitle) share one result; the same clip with another subtitle goes in the next
    round of the same batch."""

    def __init__(self, predict: Callable[[list[Path], dict[str, str], bool], list[Any]], *, batch_max: int = 8,
                 wait_s: float = 0.05):
        self.predict, self.batch_max, self.wait_s = predict, max(1, batch_max), max(0.0, wait_s)
        self.q: queue.Queue[Job | None] = queue.Queue()
        self.batches: list[int] = []          # sizes of the batches run (tests, the benchmark)
        self._thread = threading.Thread(target=self._loop, name="emollama-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> cf.Future:
        self.q.put(job)
        return job.future

    @property
    def waiting(self) -> int:
        return self.q.qsize()

    def close(self) -> None:
        self.q.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            batch, deadline = [first], time.perf_counter() + self.wait_s
            stop = False
            while len(batch) < self.batch_max:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[Job]) -> None:
        self.batches.append(len(batch))
        # requests for one clip (sha256) with one subtitle share a result; a round never holds one clip
        # twice (another subtitle) nor two files of one stem (the subtitles are keyed by it)
        rounds: list[dict[tuple, list[Job]]] = []
        for job in batch:
            key = (job.sha256 or str(job.path.resolve()), job.subtitle)
            for r in rounds:
                if key in r:
                    r[key].append(job)
                    break
                if not any(k[0] == key[0] or g[0].path.stem == job.path.stem for k, g in r.items()):
                    r[key] = [job]
                    break
            else:
                rounds.append({key: [job]})
        for r in rounds:
            groups = list(r.values())
            paths = [g[0].path for g in groups]
            subs = {g[0].path.stem: g[0].subtitle for g in groups if g[0].subtitle}
            try:
                results = self.predict(paths, subs, any(job.sheet for g in groups for job in g))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for g in groups:
                    for job in g:
                        job.future.set_exception(e)
                continue
            for g, res in zip(groups, results):
                for job in g:
                    job.future.set_result(res)


def _safe_stem(name: str) -> str:
    stem = Path(name or "upload").stem
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:40].strip("_")
    return safe or "upload"


def check_video(path: Path, shown: str | None = None) -> None:
    """422 with the reason for a file that is not a usable video (probed from its header and first frame).
    ``shown``: the name the client knows it by, which replaces the server's path in the reason."""
    from emollama.extract.decode import DecodeError, probe

    if path.stat().st_size == 0:
        raise ServeError(422, "the file is empty (0 bytes)")
    hide = (lambda text: text.replace(str(path), shown)) if shown else (lambda text: text)  # noqa: E731
    try:
        info = probe(path)
    except DecodeError as e:
        raise ServeError(422, hide(f"not a usable video: {e}")) from None
    except Exception as e:  # noqa: BLE001 - PyAV raises many kinds for damaged files
        raise ServeError(422, hide(f"not a usable video: {type(e).__name__}: {e}")) from None
    if not info.has_video:
        raise ServeError(422, "no video stream (an audio file?): send a video")


def resolve_allowed(path: str, allow_dir: str | None) -> Path:
    """A server-side path, only when it lies under ``allow_dir`` once every link is resolved."""
    if not allow_dir:
        raise ServeError(403, "server-side paths are off: start the server with --allow-dir DIR to accept "
                              "paths under DIR, or upload the file")
    root = Path(allow_dir).resolve()
    p = Path(path)
    p = (root / p if not p.is_absolute() else p).resolve()
    if not p.is_relative_to(root):
        raise ServeError(403, f"{path} is outside the allowed folder ({root}): only paths under --allow-dir "
                              "are read")
    if not p.is_file():
        raise ServeError(404 if not p.exists() else 422,
                         f"{path}: no such file under the allowed folder" if not p.exists()
                         else f"{path} is not a file")
    return p


class Service:
    """The loaded run and everything the endpoints share (no web framework in it: tests use it directly)."""

    def __init__(self, predictor, settings: ServeSettings):
        from emollama.train.tiny import TINY_WARNING

        self.predictor, self.settings = predictor, settings
        self.token = settings.token if settings.token is not None else (os.environ.get(TOKEN_ENV) or None)
        run = predictor.run
        self.note = TINY_WARNING if run.tiny else None
        self.sheets = Path(settings.sheets_dir) if settings.sheets_dir else run.path / "serve" / "sheets"
        self.sheets.mkdir(parents=True, exist_ok=True)
        base = settings.upload_dir
        if base:
            Path(base).mkdir(parents=True, exist_ok=True)
        self.uploads = Path(tempfile.mkdtemp(prefix="emollama-serve-", dir=base))
        self.model_lock = threading.Lock()   # the batcher and the timelines take turns with the model
        self.timelines = self.sheets.parent / "timelines"
        self.batcher = Batcher(self._predict, batch_max=settings.batch_max, wait_s=settings.batch_wait_s)
        self.started = time.time()
        self.answered = 0

    def close(self) -> None:
        self.batcher.close()
        shutil.rmtree(self.uploads, ignore_errors=True)

    # -- what the endpoints return

    def run_info(self) -> dict[str, Any]:
        run = self.predictor.run
        cfg = run.config
        reader = self.predictor.stores.reader
        try:
            profiles = reader.profiles(run.feature_keys) if reader is not None else {}
        except Exception:  # noqa: BLE001 - a set the store does not hold (yet): its profile is unknown
            profiles = {}
        profiles = {k: profiles.get(k) for k in run.feature_keys}
        return {"run": str(run.path), "name": run.name, "labels": list(run.labels), "profile": cfg.model.profile,
                "llm": cfg.model.llm, "prompt_style": cfg.data.prompt, "layout": self.predictor.layout,
                "feature_sets": {f: k for f, k in zip(cfg.data.features, run.feature_keys)},
                "feature_profiles": profiles, "step": run.step, "tiny": run.tiny, "note": self.note}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "run": self.predictor.run.name, "queued": self.batcher.waiting,
                "answered": self.answered, "uptime_s": round(time.time() - self.started, 1),
                "token_required": self.token is not None, "note": self.note}

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token.encode())

    def upload_folder(self) -> Path:
        """A fresh folder for one upload (removed once it is answered)."""
        folder = self.uploads / uuid.uuid4().hex
        folder.mkdir()
        return folder

    @staticmethod
    def upload_name(filename: str | None, sha: str) -> str:
        """The upload's file name, hence its clip id in the eval store: its own stem and 12 hex of its sha256."""
        suffix = "".join(ch for ch in Path(filename or "").suffix.lower() if ch.isalnum() or ch == ".")[:8]
        return f"{_safe_stem(filename or 'upload')}-{sha[:12]}{suffix or '.mp4'}"

    async def answer(self, path: Path, sha: str | None, subtitle: str | None, *, file: str,
                     sheet: bool = True) -> dict[str, Any]:
        await asyncio.to_thread(check_video, path, file)
        job = Job(path, sha, subtitle.strip() if subtitle and subtitle.strip() else None, sheet)
        from emollama.pipeline.cli_eval import _user_errors

        try:
            res = await asyncio.wrap_future(self.batcher.submit(job))
        except _user_errors() as e:
            raise ServeError(422, f"{file}: {e}") from None
        self.answered += 1
        d = res.to_dict()
        d["file"] = file
        d["sha256"] = sha
        d["sheet_url"] = f"/v1/sheets/{Path(res.preview).name}" if res.preview else None
        d["waited_s"] = round(time.perf_counter() - job.queued, 4)
        if d.get("note") is None:
            d["note"] = self.note
        if res.error:
            raise ServeError(422, f"{file}: {res.error.replace(str(path), file)}")
        return d

    def _predict(self, paths: list[Path], subtitles: dict[str, str], sheets: bool = True) -> list[Any]:
        """The batcher's call: the clips, named by their file stem, through the run; a clip whose content a
        store holds is read from it (infer's rule). ``sheets``: the contact sheets too (made by the extraction
        for a new clip; for a stored clip made once, by decoding and tracking its faces again)."""
        s = self.settings
        with self.model_lock:
            return self.predictor.predict([str(p) for p in paths], subtitles=subtitles or None, reason=s.reason,
                                          max_new_tokens=s.max_new_tokens, batch_size=max(1, s.batch_max),
                                          preview=self.sheets if sheets else None, missing_audio=s.missing_audio)

    async def timeline(self, path: Path, sha: str, settings, *, file: str) -> dict[str, Any]:
        """``pipeline.timeline.run_timeline`` on a video (its windows' predictions take the model in turn
        with the batcher's); the CSV, plot and JSON go to ``<run>/serve/timelines/<stem>-<sha12>/``."""
        from emollama.extract.decode import DecodeError
        from emollama.pipeline.timeline import run_timeline

        await asyncio.to_thread(check_video, path, file)
        if problems := settings.problems():
            raise ServeError(422, "; ".join(problems))
        name = f"{_safe_stem(file)}-{sha[:12]}"
        try:
            result = await asyncio.to_thread(run_timeline, _Locked(self.predictor, self.model_lock, self.settings),
                                             path, settings, out=self.timelines / name, shown=file)
        except DecodeError as e:
            raise ServeError(422, f"{file}: {str(e).replace(str(path), file)}") from None
        d = result.to_dict()
        d["sha256"] = sha
        d["plot_url"] = f"/v1/timelines/{name}/timeline.png"
        d["csv_url"] = f"/v1/timelines/{name}/timeline.csv"
        d.pop("csv", None)
        d.pop("plot", None)
        return d


class _Locked:
    """The predictor as ``run_timeline`` sees it: each ``predict`` holds the model lock, missing audio as
    the server was started."""

    def __init__(self, predictor, lock: threading.Lock, settings: ServeSettings):
        self._p, self._lock, self._s = predictor, lock, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)

    def predict(self, paths, **kw):
        with self._lock:
            return self._p.predict(paths, missing_audio=self._s.missing_audio, **kw)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def create_app(service: Service):
    """The FastAPI app over ``service``."""
    s = service.settings
    app = FastAPI(title="emollama", version="1", summary="Emotion recognition and reasoning for video clips "
                  "with an emollama run (labels, probabilities, reasoning, face crops).")
    if s.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(s.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(UploadLimit, limit=s.max_upload_bytes, mb=s.max_upload_mb, note=service.note)

    @app.exception_handler(ServeError)
    async def _refused(request: Request, e: ServeError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": e.reason, "note": service.note}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse({"detail": f"invalid request: {where}", "note": service.note}, status_code=422)

    @app.exception_handler(Exception)
    async def _failed(request: Request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(e).__name__}: {e}); the server log has the "
                                       "traceback", "note": service.note}, status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not service.authorized(request.headers.get("authorization")):
            return JSONResponse({"detail": "a bearer token is required: send 'Authorization: Bearer TOKEN' "
                                           "(the token the server was started with)", "note": service.note},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/v1/health")
    async def health():
        """Whether the server is up, its queue, and the tiny profile's warning where it applies."""
        return service.health()

    @app.get("/v1/run")
    async def run_info():
        """The loaded run: labels, profile, feature sets, prompt style."""
        return service.run_info()

    @app.get("/v1/sheets/{name}")
    async def sheet(name: str):
        """A clip's contact sheet (PNG): its face crops, then the global frame."""
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".png"):
            raise ServeError(404, f"no contact sheet {name!r}")
        path = service.sheets / name
        if not path.is_file():
            raise ServeError(404, f"no contact sheet {name!r}")
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/timelines/{name}/{file}")
    async def timeline_file(name: str, file: str):
        """A timeline's plot (PNG), table (CSV) or result (JSON)."""
        kinds = {"timeline.png": "image/png", "timeline.csv": "text/csv", "timeline.json": "application/json"}
        path = service.timelines / name / file
        if file not in kinds or "/" in name or name.startswith(".") or not path.is_file():
            raise ServeError(404, f"no timeline file {name}/{file}")
        return FileResponse(path, media_type=kinds[file])

    @app.post("/v1/timeline")
    async def timeline(file: UploadFile = File(..., description="A video of any length."),
                       window: float = Form(4.0, description="Seconds a window lasts."),
                       hop: float = Form(2.0, description="Seconds between window starts."),
                       follow_cuts: bool = Form(True, description="Windows inside each shot."),
                       subtitle: str | None = Form(None, description="One text for every window.")):
        """Emotion over time (``emollama timeline``): the video cut into windows, each window's label and
        probabilities, the shot cuts, and the URLs of the plot and the CSV."""
        from emollama.pipeline.timeline import TimelineSettings

        _check_type(file)
        folder = service.upload_folder()
        try:
            dest, sha = await _receive(file, folder, s, service)
            settings = TimelineSettings(window=window, hop=hop, follow_cuts=follow_cuts, subtitle=subtitle)
            return await service.timeline(dest, sha, settings, file=file.filename or dest.name)
        finally:
            await file.close()
            shutil.rmtree(folder, ignore_errors=True)

    @app.post("/v1/predict")
    async def predict(request: Request, file: UploadFile | None = File(None, description="The video clip."),
                      subtitle: str | None = Form(None, description="What the person says (optional)."),
                      path: str | None = Form(None, description="A video on the server, under --allow-dir."),
                      sheet: bool = Form(True, description="Make its contact sheet (for a clip a store already "
                                         "holds, the first time, by decoding it again: false answers faster).")):
        """The label, the probability of every label, the reasoning text and the face information of one
        clip (``emollama infer --json``'s answer), its sha256 and the URL of its contact sheet."""
        if (file is None) == (path is None):
            raise ServeError(422, "send one video: a multipart 'file', or a 'path' on the server")
        if path is not None:
            p = resolve_allowed(path, s.allow_dir)
            return await service.answer(p, await asyncio.to_thread(sha256_of, p), subtitle, file=path, sheet=sheet)
        _check_type(file)
        folder = service.upload_folder()
        try:
            dest, sha = await _receive(file, folder, s, service)
            return await service.answer(dest, sha if dest.stat().st_size else None, subtitle,
                                        file=file.filename or dest.name, sheet=sheet)
        finally:
            await file.close()
            shutil.rmtree(folder, ignore_errors=True)

    app.state.service = service
    return app


def _check_type(file) -> None:
    """415 for an upload whose declared content type is no video."""
    ctype = (file.content_type or "").lower()
    if not ctype.startswith(VIDEO_TYPES):
        raise ServeError(415, f"the upload's content type is {ctype or 'missing'!r}: send a video "
                              "(video/*, or application/octet-stream)")


async def _receive(file, folder: Path, s: ServeSettings, service: Service) -> tuple[Path, str]:
    """The upload written into ``folder`` (413 past the limit), named by its stem and sha256; (path, sha256)."""
    h, size, part = hashlib.sha256(), 0, folder / "upload.part"
    with open(part, "wb") as out:
        while block := await file.read(CHUNK):
            size += len(block)
            if size > s.max_upload_bytes:
                raise ServeError(413, f"the upload is over the limit of {s.max_upload_mb:g} MB (--max-upload-mb)")
            h.update(block)
            out.write(block)
    sha = h.hexdigest()
    return part.rename(folder / service.upload_name(file.filename, sha)), sha


class UploadLimit:
    """413 for a request body over ``limit`` bytes: at once from its Content-Length, else as soon as the
    bytes received pass it (so nothing over the limit is spooled to disk)."""

    def __init__(self, app, limit: int, mb: float, note: str | None = None):
        self.app, self.limit, self.mb, self.note = app, limit, mb, note

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        # the multipart framing adds a few hundred bytes to the file itself
        limit = self.limit + 64 * 1024
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send)
        seen, over, sent = 0, False, False

        async def counted():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge()
            return msg

        async def tracked(msg):
            # once over the limit, the app's own answer (a parse error, say) gives way to the 413
            nonlocal sent
            if over:
                if not sent:
                    sent = True
                    await self._too_large(send)
                return
            sent = sent or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            pass
        if over and not sent:
            await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps({"detail": f"the upload is over the limit of {self.mb:g} MB (--max-upload-mb)",
                           "note": self.note}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def load_service(settings: ServeSettings, *, store: str | None = None, cache_store: str | None = None,
                 device: str = "auto", offline: bool | None = None, layout: str = "trained",
                 features: Sequence[str] = ()) -> Service:
    """The run loaded once (quietly) and its service."""
    from emollama.pipeline.inference import Predictor

    predictor = Predictor.from_run(settings.run, store=store, cache_store=cache_store, device=device,
                                   layout=layout, features=features, offline=offline)
    return Service(predictor, settings)


def serve(service: Service) -> None:
    """Serve until Ctrl-C (uvicorn), then stop the batcher and remove the upload folder."""
    import uvicorn

    s = service.settings
    app = create_app(service)
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level="warning")
    finally:
        service.close()

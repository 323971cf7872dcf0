"""The playground's ASGI app: a page at ``/``, a JSON/SSE API under ``/api``, ``/healthz``.

Requests never share mutable model state: :func:`deeprnn.generate.generate` builds its hidden state per
call and only reads the weights, and every model is loaded once, in eval mode. Generation runs on a
small thread pool behind a bounded queue, so the event loop stays free to stream and a flood of requests
gets 503 instead of unbounded memory. Request bodies are capped (413) before any JSON is parsed.

Streaming (``"stream": true``) answers ``text/event-stream``::

    event: start   data: {"model", "prefix", "num_samples", "seed", ...}
    event: token   data: {"i": sample index, "text": the characters produced since the last event}
    ...
    event: done    data: {"samples": [full strings, prefix included], "elapsed_s", "tokens_per_s"}
    (or)  event: error   data: {"detail": one line}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException  # what FastAPI raises for a body it cannot parse

from deeprnn import __version__
from deeprnn.checkpoint import load_checkpoint, resolve_checkpoint
from deeprnn.errors import CheckpointError, ConfigError, DeepRNNError, VocabError
from deeprnn import generate as _gen

log = logging.getLogger("deeprnn.serve")

STATIC_DIR = Path(__file__).with_name("static")
MAX_PREDS = 2000
MAX_SAMPLES = 16
MAX_BEAM = 16
MAX_PREFIX = 2000
MAX_BODY = 16 * 1024
_RUN_SCAN_DEPTH = 3
_CKPT_NAMES = ("best", "last", ".best.old", ".last.old")
RESCAN_SECONDS = 5.0  # a request this long after the last look at the paths looks again (new, retrained runs)


# -- models -------------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    """One servable model: the loaded network and vocabulary plus what the model card shows."""

    id: str
    checkpoint: Path
    run_dir: Path | None
    model: Any
    vocab: Any
    card: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the path it was found by (given, or found in a directory given)
    direct: bool = True  # named on the command line, not found in a directory
    fingerprint: tuple | None = None  # its run's files as loaded (_fingerprint)
    failed: tuple | None = None  # files seen since that would not load (or the error): not warned about again

    @property
    def curve(self) -> Path | None:
        p = self.run_dir / "curve.png" if self.run_dir is not None else None
        return p if p is not None and p.is_file() else None

    def curve_url(self) -> str | None:
        """The curve's address, with the file's time in it: a retrained run's new curve is not one a browser
        has cached."""
        curve = self.curve
        if curve is None:
            return None
        return f"/api/model/curve.png?model={_quote(self.id)}&v={curve.stat().st_mtime_ns}"


def _run_dir_of(given: Path, ckpt: Path) -> Path | None:
    if given.is_dir() and given.resolve() != ckpt.resolve():
        return given
    return ckpt.parent if ckpt.name in _CKPT_NAMES else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _card(entry_id: str, ckpt, run_dir: Path | None) -> dict[str, Any]:
    meta, vocab = ckpt.meta, ckpt.vocab
    mc = meta.get("model_config", {})
    tc = meta.get("train_config", {})
    summary = _read_json(run_dir / "summary.json") if run_dir is not None else {}
    metrics = meta.get("metrics") or {}
    pos = meta.get("position") or {}
    tokens = [t for t in vocab.idx_to_token if t != "<unk>"]
    return {
        "id": entry_id,
        "checkpoint": str(ckpt.path),
        "cell": mc.get("cell"),
        "num_layers": mc.get("num_layers"),
        "num_hiddens": mc.get("num_hiddens"),
        "impl": mc.get("impl"),
        "input": mc.get("input"),
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),
        "corpus": tc.get("corpus"),
        "normalization": tc.get("normalization"),
        "token": getattr(vocab, "token", "char"),
        "vocab_size": len(vocab),
        # Characters the prefix may use (for a char vocabulary); the page shows them next to the box.
        "vocabulary": "".join(sorted(tokens)) if getattr(vocab, "token", "char") == "char" else None,
        "steps": pos.get("step"),
        "tokens_seen": pos.get("tokens"),
        "valid_ppl": _finite(metrics.get("val_ppl")),
        "valid_bpc": _finite(metrics.get("val_bpc")),
        "test_ppl": _finite(summary.get("test_ppl")),
        "test_bpc": _finite(summary.get("test_bpc")),
        "default_prefix": tc.get("prefix") or None,
        "curve_url": None,  # filled by the registry once it knows the file exists
    }


def _find_runs(root: Path, depth: int) -> list[Path]:
    """Directories under ``root`` holding a checkpoint, not descending into the ones found."""
    found: list[Path] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        try:
            resolve_checkpoint(child)
        except CheckpointError:
            if depth > 1:
                found.extend(_find_runs(child, depth - 1))
            continue
        except OSError as e:  # a directory this user cannot read: the others are still offered
            log.warning("skipping %s: %s", child, e)
            continue
        found.append(child)
    return found


def _fingerprint(given: Path, ckpt_dir: Path) -> tuple:
    """What changes when a run is saved again: a save replaces the checkpoint folder whole, so its
    ``checkpoint.json`` is a new file (inode, time, size); the run's ``summary.json`` (the test score) and
    ``curve.png``, which the card shows, are written after the last save. A file that cannot be read
    counts as absent."""
    run_dir = _run_dir_of(given, ckpt_dir)
    files = [ckpt_dir / "checkpoint.json"]
    if run_dir is not None:
        files += [run_dir / "summary.json", run_dir / "curve.png"]
    marks: list = [str(ckpt_dir.resolve())]
    for f in files:
        try:
            st = f.stat()
        except OSError:
            marks.append(None)
        else:
            marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(marks)


class Registry:
    """The models a server offers, by id; read-only once built (safe to share between threads). A server
    that looks again for new and retrained runs builds a new one (:meth:`from_paths` with ``reuse``)."""

    def __init__(self, entries: list[ModelEntry], skipped: list[dict[str, str]] | None = None):
        if not entries:
            raise CheckpointError("no model to serve; give a run directory, a checkpoint or a directory of runs")
        self._entries = {e.id: e for e in entries}
        self.default = entries[0].id
        self.skipped = skipped or []

    def ids(self) -> list[str]:
        return list(self._entries)

    def get(self, model_id: str | None) -> ModelEntry | None:
        return self._entries.get(self.default if model_id is None else model_id)

    def __iter__(self):
        return iter(self._entries.values())

    @classmethod
    def from_paths(cls, paths, device: str = "cpu", reuse: "Registry | None" = None) -> "Registry":
        """Load every run/checkpoint named by ``paths``; a directory of runs offers each run inside.

        A path given directly must load (``CheckpointError`` otherwise); a broken run found while
        scanning a directory is skipped and listed in ``skipped``.

        With ``reuse`` (the registry being served), this is a second look: a model whose checkpoint is
        unchanged is kept as loaded, a new run is loaded, a retrained one loaded again, and a run gone from a
        directory is dropped. A path given directly that no longer loads (a run being retrained with
        ``--overwrite``) keeps its model, as does a run whose new checkpoint does not load.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        before = {} if reuse is None else {(e.source, e.direct): e for e in reuse}
        found: list[tuple[str, Path, bool]] = []  # (id, path, given directly)
        for raw in paths:
            p = Path(raw)
            try:
                resolve_checkpoint(p)
            except (CheckpointError, OSError):
                if (str(p), True) in before or not p.is_dir():
                    # a served run that does not load now (--overwrite removed its checkpoints): kept below
                    if reuse is None:
                        raise
                    found.append((cls._direct_id(p), p, True))
                    continue
                runs = _find_runs(p, _RUN_SCAN_DEPTH)
                if not runs and reuse is None:
                    raise CheckpointError(
                        f"{p} holds no deeprnn run or checkpoint (looked {_RUN_SCAN_DEPTH} levels deep); "
                        "train one with `deeprnn train --run-dir ...`"
                    ) from None
                found.extend((r.relative_to(p).as_posix(), r, False) for r in runs)
                continue
            found.append((cls._direct_id(p), p, True))
        entries: list[ModelEntry] = []
        skipped: list[dict[str, str]] = []
        # A model keeps its id while it is served (a page's choice keeps meaning the same run); a new one takes
        # its name, or the name with -2, -3, … when that is taken.
        taken: set[str] = {before[(str(p), direct)].id for _, p, direct in found if (str(p), direct) in before}
        for model_id, p, direct in found:
            old = before.get((str(p), direct))
            if old is not None:
                unique = old.id
            else:
                unique, n = model_id, 2
                while unique in taken:
                    unique, n = f"{model_id}-{n}", n + 1
            fingerprint = None
            try:
                fingerprint = _fingerprint(p, resolve_checkpoint(p))
                if old is not None and fingerprint in (old.fingerprint, old.failed):
                    entry = old  # unchanged, or the same files that would not load last time
                else:
                    entry = cls._load(unique, p, direct, device, fingerprint)
                    if reuse is not None:
                        log.info("%s model %s from %s", "reloaded" if old else "added", unique, entry.checkpoint)
            except (DeepRNNError, OSError) as e:
                if old is not None:
                    failed = fingerprint if fingerprint is not None else ("error", str(e))
                    if failed != old.failed:  # once for each new state of its files
                        log.warning("keeping model %s as loaded: %s", old.id, e)
                    entry = dataclasses.replace(old, failed=failed)
                elif direct and reuse is None:
                    raise
                else:
                    if reuse is None or {"path": str(p), "reason": str(e)} not in reuse.skipped:  # once
                        log.warning("skipping %s: %s", p, e)
                    skipped.append({"path": str(p), "reason": str(e)})
                    continue
            taken.add(unique)
            entries.append(entry)
        if reuse is not None:
            kept = {(e.source, e.direct) for e in entries}
            for key, gone in before.items():
                if key not in kept:
                    log.info("dropped model %s (%s): its run is gone", gone.id, gone.source)
        return cls(entries, skipped)

    @staticmethod
    def _direct_id(p: Path) -> str:
        name = p.resolve().name
        return f"{p.resolve().parent.name}/{name}" if name in _CKPT_NAMES else name

    @staticmethod
    def _load(model_id: str, p: Path, direct: bool, device: str, fingerprint) -> ModelEntry:
        ckpt = load_checkpoint(p, map_location=device)
        ckpt.model.eval()  # generate() also runs under inference_mode; eval here keeps it stable
        run_dir = _run_dir_of(p, ckpt.path)
        entry = ModelEntry(model_id, ckpt.path, run_dir, ckpt.model, ckpt.vocab, _card(model_id, ckpt, run_dir),
                           source=str(p), direct=direct, fingerprint=fingerprint)
        entry.card["curve_url"] = entry.curve_url()
        return entry


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


# -- the worker pool ----------------------------------------------------------------------------


class QueueFull(Exception):
    """Every worker is busy and the waiting line is full."""


class GenerationPool:
    """A thread pool with at most ``workers + max_queue`` requests admitted at once (running or waiting)."""

    def __init__(self, workers: int, max_queue: int):
        self.workers, self.max_queue = workers, max_queue
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="deeprnn-generate")
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Run ``fn`` on a worker; raises :class:`QueueFull` instead of waiting when the line is full."""
        with self._lock:
            if self._admitted >= self.workers + self.max_queue:
                raise QueueFull
            self._admitted += 1
        try:
            fut = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _f: self._release())
        return fut

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- request and response bodies ----------------------------------------------------------------


class GenerateRequest(BaseModel):
    """Body of ``POST /api/generate``; the fields are :func:`deeprnn.generate.generate`'s arguments."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "10" or true is not a number of tokens

    prefix: str = Field(min_length=1, max_length=MAX_PREFIX, description="text the continuation starts from")
    num_preds: int = Field(100, ge=0, le=MAX_PREDS, description="tokens (characters) to generate")
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False, description="sampling temperature")
    top_k: int | None = Field(None, ge=1, description="sample only among the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling: smallest set reaching this mass")
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES, description="independent continuations")
    beam_width: int = Field(4, ge=1, le=MAX_BEAM, description="beams kept by beam search")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="fixes the draws; null picks one (returned)")
    model: str | None = Field(None, description="model id from /api/models (default: the first)")
    unk: Literal["error", "replace"] = Field("error", description="prefix tokens outside the vocabulary")
    stream: bool = Field(False, description="answer with server-sent events as the text is produced")

    @model_validator(mode="after")
    def _beam_samples(self) -> "GenerateRequest":
        if self.strategy == "beam" and self.num_samples > self.beam_width:
            raise ValueError(
                f"num_samples must be <= beam_width for beam search, got num_samples={self.num_samples} "
                f"and beam_width={self.beam_width}"
            )
        return self


class GenerateResponse(BaseModel):
    model: str
    prefix: str
    strategy: str
    seed: int | None
    num_preds: int
    samples: list[str]
    elapsed_s: float
    tokens_per_s: float | None
    replaced: list[str] = []  # prefix tokens outside the vocabulary fed as <unk> (unk "replace")


# What a 404 or 405 lists (the routes below; the page is at /)
API_ROUTES = "GET /api/models, GET /api/model, GET /api/model/curve.png, POST /api/generate and GET /healthz"


def _error(status: int, message: str, field_name: str | None = None, **extra) -> JSONResponse:
    errors = [{"field": field_name, "message": message, **extra}] if field_name else []
    return JSONResponse({"detail": message, "errors": errors}, status_code=status)


EXAMPLE_BODY = '{"prefix": "time traveller", "num_preds": 100}'
# What FastAPI says when the body is not UTF-8 (or cannot be decoded as JSON for another reason
# than a syntax error, which is a RequestValidationError).
FASTAPI_PARSE_ERROR = "There was an error parsing the body"
UNPARSABLE_BODY = f"body is not valid JSON (it must be UTF-8 text holding one object, e.g. {EXAMPLE_BODY})"


def _body_message(err: dict) -> str | None:
    """Our words for an error about the body as a whole: missing, not JSON, or JSON but not an object."""
    kind, value = err.get("type"), err.get("input")
    if kind == "missing":
        return f"body is empty; send a JSON object, e.g. {EXAMPLE_BODY}"
    if kind == "model_attributes_type":
        if isinstance(value, bytes):  # sent without a JSON content type, so never parsed
            return "body was not sent as JSON; send it with the header Content-Type: application/json"
        got = "null" if value is None else {list: "an array", str: "a string", bool: "a boolean"}.get(
            type(value), "a number")
        return f"body must be a JSON object, e.g. {EXAMPLE_BODY}; got {got}"
    return None


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 whose ``detail`` is one line naming the field(s), and ``errors`` one entry per problem."""
    errors = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = ".".join(loc)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            name, msg = "body", (f"body is not valid JSON ({err.get('ctx', {}).get('error', msg)}); send one object, "
                                 f"e.g. {EXAMPLE_BODY}")
        elif name == "" and _body_message(err):
            name, msg = "body", _body_message(err)
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        if not name:
            # A whole-body error: a model validator (its message starts with the field) or bad JSON.
            name = msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in GenerateRequest.model_fields else "body"
        errors.append({"field": name, "message": msg if msg.startswith(name) else f"{name}: {msg}"})
    detail = "; ".join(e["message"] for e in errors) or "invalid request"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)



def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _client_left(request: Request) -> None:
    """Returns when the client has hung up. The body has been read by then, so the server's next message
    is ``http.disconnect``: when the connection drops, or once the response is sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the body-size guard ------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for request bodies over ``max_body`` bytes, by ``Content-Length`` or by counting the stream.

    The body (at most ``max_body`` bytes) is read here and replayed to the app, so the app never sees a
    partial body; after it, ``receive`` is the server's again (disconnect detection keeps working).
    """

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await self._reject(send, 400, "Content-Length is not a number")
            if n > self.max_body:
                return await self._too_large(send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS") and length is None \
                and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away before sending its body.
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await self._too_large(send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    async def _too_large(self, send):
        await self._reject(send, 413, f"request body is larger than {self.max_body} bytes; "
                                      "shorten the prefix (the limit is the server's max_body)")

    @staticmethod
    async def _reject(send, status: int, message: str):
        body = json.dumps({"detail": message, "errors": []}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# -- the app ------------------------------------------------------------------------------------


def create_app(
    paths,
    *,
    device: str = "cpu",
    workers: int = 2,
    max_queue: int = 32,
    max_body: int = MAX_BODY,
    rescan: float = RESCAN_SECONDS,
) -> FastAPI:
    """The playground app for the runs/checkpoints in ``paths`` (one path or a list).

    ``workers`` threads generate; up to ``max_queue`` more requests wait for one, further ones get 503.
    Bodies over ``max_body`` bytes get 413. A request coming ``rescan`` seconds or more after the last look
    at ``paths`` looks again first (``Registry.from_paths`` with ``reuse``): new runs are offered, retrained
    ones reloaded; 0 loads the models once. Raises ``CheckpointError`` when a path holds no usable
    checkpoint and ``ConfigError`` for out-of-range arguments or a device this machine lacks.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if not isinstance(max_body, int) or max_body < 1024:
        raise ConfigError(f"max_body must be an integer >= 1024 (bytes), got {max_body!r}")
    if isinstance(rescan, bool) or not isinstance(rescan, (int, float)) or not 0 <= rescan < math.inf:
        raise ConfigError(f"rescan must be a number of seconds >= 0 (0: load the models once), got {rescan!r}")
    from deeprnn.train import resolve_device

    device = str(resolve_device(device))
    registry = Registry.from_paths(paths, device=device)
    pool = GenerationPool(workers, max_queue)
    looked = [time.monotonic()]  # when the paths were last looked at
    looking = threading.Lock()

    def look_again() -> None:
        with looking:  # one look at a time; a request that waited for one finds it done
            if time.monotonic() - looked[0] < rescan:
                return
            try:
                app.state.registry = Registry.from_paths(paths, device, app.state.registry)
            except CheckpointError as e:  # every model gone: keep serving what is loaded
                log.warning("keeping the models loaded: %s", e)
            except Exception:  # noqa: BLE001 - a second look never stops the serving of the first
                log.exception("looking for new and retrained runs failed; keeping the models loaded")
            looked[0] = time.monotonic()

    async def current() -> Registry:
        """The registry, looked for again first when it is ``rescan`` seconds old: loading a new or retrained
        run happens off the event loop, and requests that come meanwhile wait for it."""
        if rescan and time.monotonic() - looked[0] >= rescan:
            await asyncio.to_thread(look_again)
        return app.state.registry

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown()

    app = FastAPI(
        title="deeprnn playground",
        version=__version__,
        description="Generate text with deep recurrent language models (d2l section 9.3).",
        lifespan=lifespan,
        # The schema is at /openapi.json; FastAPI's /docs and /redoc load their UI from a CDN,
        # which an offline machine cannot reach, so they are off.
        docs_url=None,
        redoc_url=None,
    )
    app.state.registry = registry
    app.state.pool = pool
    app.add_middleware(BodyLimitMiddleware, max_body=max_body)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError):
        return _validation_response(exc)

    @app.exception_handler(HTTPException)
    async def _on_http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400 and exc.detail == FASTAPI_PARSE_ERROR:
            return _error(400, UNPARSABLE_BODY, "body")
        if exc.status_code in (404, 405):  # routing's: one line naming the request, in every error's shape
            path = request.url.path
            what = f"no such path: {path}" if exc.status_code == 404 else f"{path} does not take {request.method}"
            return JSONResponse({"detail": f"{what}; the API is {API_ROUTES}", "errors": []},
                                status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["service"], summary="liveness and load")
    async def healthz():
        return {"status": "ok", "version": __version__, "models": len(app.state.registry.ids()),
                "workers": pool.workers, "admitted": pool.admitted, "max_queue": pool.max_queue}

    @app.get("/api/models", tags=["models"], summary="every model offered, with its card")
    async def models():
        registry = await current()
        return {"default": registry.default, "models": [e.card for e in registry], "skipped": registry.skipped}

    @app.get("/api/model", tags=["models"], summary="one model's card (default: the first model)")
    async def model_card(model: str | None = Query(None, description="model id from /api/models")):
        registry = await current()
        entry = registry.get(model)
        if entry is None:
            return _unknown_model(registry, model)
        return entry.card

    @app.get("/api/model/curve.png", tags=["models"], summary="the training curve plotted by the run",
             response_class=FileResponse)
    async def curve(model: str | None = Query(None, description="model id from /api/models")):
        registry = await current()
        entry = registry.get(model)
        if entry is None:
            return _unknown_model(registry, model)
        if entry.curve is None:
            return _error(404, f"model {entry.id!r} has no training curve (no curve.png in its run directory)")
        return FileResponse(entry.curve, media_type="image/png")

    def _unknown_model(registry: Registry, model_id) -> JSONResponse:
        return _error(404, f"model {model_id!r} not found; choose one of: {', '.join(registry.ids())}", "model")

    @app.post(
        "/api/generate",
        tags=["generate"],
        summary="continue a prefix",
        response_model=GenerateResponse,
        responses={
            200: {"content": {"text/event-stream": {}},
                  "description": "JSON, or server-sent events (start, token..., done | error) with stream=true"},
            404: {"description": "unknown model"},
            413: {"description": "request body too large"},
            422: {"description": "a field is out of range, or the prefix has tokens outside the vocabulary"},
            503: {"description": "every worker busy and the queue full; retry later"},
        },
    )
    async def generate_endpoint(req: GenerateRequest, request: Request):
        registry = await current()
        entry = registry.get(req.model)
        if entry is None:
            return _unknown_model(registry, req.model)
        try:
            toks = _gen.prefix_tokens(entry.vocab, req.prefix)  # " " is a character, but no word
        except ConfigError as e:
            return _error(422, str(e), "prefix")
        missing = _gen.unknown_tokens(entry.vocab, toks)
        if missing and req.unk == "error":
            return _error(422, _gen.unknown_prefix_message(entry.vocab, missing, req.prefix,
                                                           entry.card.get("normalization")),
                          "prefix", invalid=missing)
        seed = req.seed
        if seed is None and req.strategy == "sample":
            # returned, so any sample can be reproduced (a 63-bit seed came back rounded by the page's JSON.parse)
            seed = _gen.fresh_seed()
        args = dict(strategy=req.strategy, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                    num_samples=req.num_samples, beam_width=req.beam_width, seed=seed, unk=req.unk)
        head = {"model": entry.id, "prefix": req.prefix, "strategy": req.strategy, "seed": seed,
                "num_preds": req.num_preds,
                "replaced": missing}  # unk "replace": the tokens fed as <unk> (a warning on the server's stderr before)
        if req.stream:
            return _stream(entry, req, args, head)
        t0 = time.perf_counter()
        gone = threading.Event()
        try:
            fut = pool.submit(_run, entry, req.prefix, req.num_preds, args, None, gone)
        except QueueFull:
            return _busy()
        result, left = asyncio.wrap_future(fut), asyncio.ensure_future(_client_left(request))
        try:
            await asyncio.wait((result, left), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled
            left.cancel()
            hung_up = not result.done()
            if hung_up:  # its request leaves the queue, or its worker stops before the next token
                gone.set()
                result.cancel()  # cancels ``fut`` if it is still queued; its Stopped is never reported
        if hung_up:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        try:
            samples, decoding = result.result()
        except (ConfigError, VocabError) as e:
            return _error(422, str(e), str(e).split(" ", 1)[0])
        except MemoryError as e:  # not now: the memory is taken (the limits keep a request small)
            resp = _error(503, f"out of memory: {e}" if str(e) else "out of memory; retry in a moment")
            resp.headers["Retry-After"] = "1"
            return resp
        return {**head, "samples": samples, **_timing(req, time.perf_counter() - t0, decoding)}

    def _busy() -> JSONResponse:
        resp = _error(503, f"server busy: {pool.workers} worker(s) and {pool.max_queue} queued requests; "
                           "retry in a moment")
        resp.headers["Retry-After"] = "1"
        return resp

    def _stream(entry: ModelEntry, req: GenerateRequest, args: dict, head: dict):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def on_text(i: int, piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, piece))

        t0 = time.perf_counter()
        try:
            fut = pool.submit(_run, entry, req.prefix, req.num_preds, args, on_text, gone)
        except QueueFull:
            return _busy()

        def finished(f: concurrent.futures.Future) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, None)

        fut.add_done_callback(finished)

        async def events():
            try:
                yield _sse("start", {**head, "num_samples": req.num_samples})
                done = False
                while not done:
                    item = await queue.get()
                    batch: dict[int, list[str]] = {}
                    # Coalesce what has piled up since the last event: one event per sample, not per char.
                    while item is not None:
                        batch.setdefault(item[0], []).append(item[1])
                        if queue.empty():
                            break
                        item = queue.get_nowait()
                    done = item is None
                    if batch:  # one write per batch, one event per sample in it
                        yield b"".join(_sse("token", {"i": i, "text": "".join(pieces)})
                                       for i, pieces in sorted(batch.items()))
                    # Let the loop run: the worker's queued pieces land (fewer, larger events) and a
                    # closed connection is noticed before we write to it again.
                    await asyncio.sleep(0)
                try:
                    samples, decoding = fut.result()
                except DeepRNNError as e:
                    yield _sse("error", {"detail": str(e)})
                    return
                except Exception as e:  # noqa: BLE001 - reported to the client, logged here
                    log.exception("generation failed")
                    yield _sse("error", {"detail": f"generation failed: {type(e).__name__}: {e}"})
                    return
                yield _sse("done", {"samples": samples, **_timing(req, time.perf_counter() - t0, decoding)})
            finally:
                gone.set()  # a client that left stops its worker before the next token (beam search's too)
                fut.cancel()  # or takes its request out of the queue

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _run(entry: ModelEntry, prefix: str, num_preds: int, args: dict, on_text,
         gone: threading.Event) -> tuple[list[str], float]:
    """One generation on a worker thread, and the seconds it took (not the wait in the queue); the state lives
    in this call only. Prefix tokens fed as <unk> are the answer's ``replaced`` field, not a warning on the
    server's stderr. Once ``gone`` is set (the client hung up), it raises ``generate.Stopped`` before the next
    token."""
    t0 = time.perf_counter()
    samples = _gen.generate(entry.model, entry.vocab, prefix, num_preds, on_text=on_text, warn_unknown=False,
                            stop=gone, **args)
    return samples, time.perf_counter() - t0


def _timing(req: GenerateRequest, elapsed: float, decoding: float) -> dict[str, float | None]:
    """``elapsed_s``: the request's time, from its arrival to its last token (the queue included);
    ``tokens_per_s``: the tokens the model decoded per second of decoding. Greedy decoding computes one
    stream however many copies are asked for, a beam search ``beam_width`` streams."""
    streams = {"greedy": 1, "beam": req.beam_width}.get(req.strategy, req.num_samples)
    return {"elapsed_s": round(elapsed, 4),
            "tokens_per_s": round(req.num_preds * streams / decoding, 1) if decoding > 0 else None}

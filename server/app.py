"""The FastAPI app: engine lifecycle, routers, the guard and metrics middleware.

Where a request goes: `server/routes/<resource>.py` (one router per resource) ->
one service object in `server/services/<resource>.py` -> `server/engine/engine.py` (the
façade over vLLM).

Faults: an engine that dies makes /health, new and in-flight requests answer 503, then
the process exits with status 1 a moment later (as `vllm serve` does) so a supervisor
restarts it. No exception closes a kept-alive connection: the guard turns every one into
a complete response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from vllm.exceptions import VLLMClientError

from server.engine.engine import Engine, EngineOverloaded, EntropyUnavailable, WeightLoadError
from server.errors import ApiError, api_error_handler, error_response, validation_error_handler
from server.metrics import Metrics
from server.routes import compress, health, openai, score, viewer, weights
from server.routes.deps import engine_dead, unauthorized
from server.services.weights import WeightService
from server.settings import ServerSettings
from server.weightgate import HeldUpdate, WeightGate
from stepzip.grader import Grader

log = logging.getLogger("stepzip.app")

EXIT_GRACE_S = 1.0  # lets in-flight requests receive their 503 before the process exits
# An oversized body up to this size is read and dropped before the 413, so a client still
# sending it reads the answer and the connection stays usable; past it the 413 closes.
DISCARD_LIMIT = 64 * 2**20


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_start(app))
        app.state.grader.start()
        try:
            yield
        finally:
            task.cancel()
            app.state.grader.close()
            await engine.shutdown()

    app = FastAPI(title="stepzip", version="0.1.0", lifespan=lifespan,
                  description="Step-entropy chain-of-thought compression over vLLM. "
                              "Entropies are in nats, of the full next-token distribution "
                              "at temperature 1 (after penalties, before top-k/top-p).")
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = Metrics()
    app.state.grader = Grader(workers=settings.grading_workers,
                              timeout=settings.grading_timeout)
    app.state.grader.on_grade = app.state.metrics.observe_grade
    app.state.compressor = None
    app.state.scorer = None
    app.state.openai = None
    app.state.startup_error = None
    app.state.exit_code = 0  # `stepzip serve` exits with it (1 after engine death)
    app.state.gate = WeightGate()
    app.state.gate_hold = HeldUpdate()
    app.state.weights = WeightService(engine, app.state.settings, app.state.gate,
                                      app.state.gate_hold)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_middleware(GuardMiddleware, app_state=app.state)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: sees 401/413
    app.include_router(health.router)
    app.include_router(compress.router)
    app.include_router(openai.router)
    app.include_router(weights.router)
    app.include_router(score.router)
    app.include_router(viewer.router)
    viewer.mount_viewer(app)
    return app


async def _start(app: FastAPI) -> None:
    from server.services.compress import Compressor
    from server.services.openai import OpenAIService
    from server.services.score import Scorer

    engine: Engine = app.state.engine
    try:
        if not engine.ready:
            await engine.start()
        engine.fetcher.observe = app.state.metrics.entropy_fetch.observe
        engine.fetcher.on_evictions = app.state.metrics.entropy_evictions.inc
        app.state.compressor = Compressor(engine, app.state.settings.step_delimiter,
                                          gate=app.state.gate, metrics=app.state.metrics,
                                          grader=app.state.grader)
        app.state.openai = OpenAIService(engine, app.state)
        app.state.scorer = Scorer(app.state.compressor)
    except Exception as exc:  # reported by /health; the process stays up to say so
        log.exception("engine start-up failed")
        app.state.startup_error = f"{type(exc).__name__}: {exc}"
        return
    await engine.watch_death(lambda: _exit_after_engine_death(app))


def _exit_after_engine_death(app: FastAPI) -> None:
    log.critical("the vLLM engine core died; answering 503 and exiting with status 1 "
                 "in %.0f s so that a supervisor restarts the server", EXIT_GRACE_S)
    app.state.exit_code = 1
    server = getattr(app.state, "uvicorn_server", None)  # set by `stepzip serve`
    if server is not None:  # a clean stop, then `stepzip serve` returns the exit code
        asyncio.get_running_loop().call_later(EXIT_GRACE_S, setattr, server, "should_exit",
                                              True)
    else:  # another ASGI server: stop it as a supervisor would
        asyncio.get_running_loop().call_later(EXIT_GRACE_S, os.kill, os.getpid(),
                                              signal.SIGTERM)


class MetricsMiddleware:
    """Counts requests and latency by route. Plain ASGI (not BaseHTTPMiddleware), so
    handlers still see client disconnects and can abort engine work."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


class BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Before any route: the API key (every path but `_public` ones, docs and schema included;
    checked before the body is read) and the body-size limit (checked before parsing).
    After: any exception still in flight becomes a complete response (503 for a dead
    engine, 429 when admission is full, 500 otherwise), so the connection stays usable;
    a stream that fails half-way ends with an SSE error event."""

    def __init__(self, app, app_state):
        self.app, self.state = app, app_state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.state.settings
        request = Request(scope)
        if settings.api_key and not _public(scope["path"]) and \
                not _authorized(request, settings.api_key):
            return await _send(request, unauthorized(), scope, receive, send)
        limit = settings.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            drained = int(length) <= DISCARD_LIMIT and await _discard_body(receive)
            return await _send(request, _too_large(limit), scope, receive, send,
                               close=not drained)
        received, too_large = 0, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                too_large = True
                raise BodyTooLarge
            return message

        started, finished, media = False, False, b""

        async def tracking_send(message):
            nonlocal started, finished, media
            if too_large:  # the route's own answer to a body cut short; ours follows
                return
            if message["type"] == "http.response.start":
                started = True
                media = dict(message.get("headers", [])).get(b"content-type", b"")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when a SIGTERM's grace period ends:
            # the client hears why instead of a dropped connection or a 500.
            if not started:
                with contextlib.suppress(Exception):
                    await _send(request, shutting_down(), scope, receive, send, close=True)
            raise
        except Exception as exc:  # noqa: BLE001 - the last line before the connection
            error = self.as_api_error(exc)
            if not started:
                drained = too_large and await _discard_body(receive, DISCARD_LIMIT - received)
                return await _send(request, error, scope, receive, send,
                                   close=too_large and not drained)
            if finished:
                return
            # Mid-stream: the status is sent; end the body cleanly instead.
            body = b""
            if media.startswith(b"text/event-stream"):
                body = b"data: " + json.dumps({"error": {
                    "message": error.error, "type": "EngineDeadError" if error.status == 503
                    else "InternalServerError", "code": error.status}}).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if too_large and not started:
            drained = await _discard_body(receive, DISCARD_LIMIT - received)
            await _send(request, _too_large(limit), scope, receive, send, close=not drained)

    def as_api_error(self, exc: BaseException) -> ApiError:
        engine = self.state.engine
        if isinstance(exc, BaseExceptionGroup):  # from a task group: the most telling one
            errors = [self.as_api_error(e) for e in exc.exceptions]
            return min(errors, key=lambda e: (e.status != 503, e.status == 500))
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, BodyTooLarge):
            return _too_large(self.state.settings.max_body_bytes)
        if engine.dead or type(exc).__name__ == "EngineDeadError":
            return engine_dead()
        if isinstance(exc, EngineOverloaded):
            return ApiError(429, f"server busy: {exc}; retry later")
        if isinstance(exc, EntropyUnavailable):
            return ApiError(503, f"entropy unavailable: {exc}")
        if isinstance(exc, WeightLoadError):
            return ApiError(422, f"could not load: {exc}", "path", str(exc))
        if isinstance(exc, VLLMClientError):  # vLLM's own request checks: a client error
            field = getattr(exc, "parameter", None) or "body"
            return ApiError(422, f"invalid request: {field}: {exc}", field, str(exc))
        log.error("unhandled error", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}")


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down (SIGTERM); the request was aborted, "
                         "retry it on another replica or after the restart")


def _public(path: str) -> bool:
    """/health (probes) and the viewer's static files: they hold no data, and the page
    sends the key the user types into it with each of its API calls."""
    return path in ("/health", "/viewer") or path.startswith("/viewer/")


def _authorized(request: Request, key: str) -> bool:
    import hmac

    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


async def _discard_body(receive, budget: int = DISCARD_LIMIT) -> bool:
    """Read and drop the rest of a body; False if it is larger than `budget` or the
    client left (then the connection must close)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if budget < 0:
            return False
        if not message.get("more_body"):
            return True


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes (--max-body-bytes)", "body",
                    f"at most {limit} bytes")


async def _send(request: Request, error: ApiError, scope, receive, send,
                close: bool = False) -> None:
    response = error_response(request, error)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if close:  # the unread rest of the body makes the connection unusable: say so
        response.headers["Connection"] = "close"
    await response(scope, receive, send)

"""The FastAPI app: engine lifecycle, routers, error handlers, metrics middleware.

Where a request goes: `server/routes/<resource>.py` (one router per resource) ->
`server/compressor.py` (the compress pipeline) -> `server/engine/engine.py` (vLLM).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.engine.engine import Engine, EntropyUnavailable
from server.errors import ApiError, api_error_handler, validation_error_handler
from server.metrics import Metrics
from server.routes import compress, health, openai, weights
from server.routes.deps import check_api_key
from server.settings import ServerSettings
from server.weightgate import HeldUpdate, WeightGate

log = logging.getLogger("stepzip.app")


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_start(app))
        try:
            yield
        finally:
            task.cancel()
            await engine.shutdown()

    app = FastAPI(title="stepzip", version="0.1.0", lifespan=lifespan,
                  dependencies=[Depends(check_api_key)],
                  description="Step-entropy chain-of-thought compression over vLLM. "
                              "Entropies are in nats, of the full next-token distribution "
                              "at temperature 1 (after penalties, before top-k/top-p).")
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = Metrics()
    app.state.compressor = None
    app.state.startup_error = None
    app.state.weight_version = "v0"
    app.state.weight_version_n = 0
    app.state.gate = WeightGate()
    app.state.gate_hold = HeldUpdate()
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(EntropyUnavailable, _entropy_unavailable)
    _add_engine_dead_handler(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(health.router)
    app.include_router(compress.router)
    app.include_router(openai.router)
    app.include_router(weights.router)
    return app


async def _start(app: FastAPI) -> None:
    from server.compressor import Compressor

    engine: Engine = app.state.engine
    try:
        if not engine.ready:
            await engine.start()
        engine.fetcher.observe = app.state.metrics.entropy_fetch.observe
        app.state.compressor = Compressor(engine, app.state.settings.step_delimiter)
    except Exception as exc:  # reported by /health; the process stays up to say so
        log.exception("engine start-up failed")
        app.state.startup_error = f"{type(exc).__name__}: {exc}"


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


async def _entropy_unavailable(_request: Request, exc: EntropyUnavailable):
    return JSONResponse({"error": f"entropy unavailable: {exc}", "details": []}, status_code=503)


def _add_engine_dead_handler(app: FastAPI) -> None:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - vLLM always present where the app runs
        return

    async def dead(_request: Request, exc: EngineDeadError):
        return JSONResponse({"error": "engine is dead; restart the server", "details": []},
                            status_code=503)

    app.add_exception_handler(EngineDeadError, dead)

"""Liveness/readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import documented

router = APIRouter(tags=["health"])


@router.get("/health", responses={503: {"description": "Starting, failed to start, or the "
                                                     "engine died (the process then exits 1)"}})
async def health(request: Request):
    engine = request.app.state.engine
    state = request.app.state
    if state.startup_error is not None:
        return JSONResponse({"status": "failed", "error": state.startup_error}, status_code=503)
    if engine.dead:
        return JSONResponse({"status": "dead", "error": "engine core died; the server is "
                             "exiting with status 1"}, status_code=503)
    if not engine.ready or state.compressor is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return {"status": "ok", "model": engine.model_name, "processor": engine.processor,
            "startup_s": engine.startup_s,
            "unfinished_requests": engine.unfinished_requests(),
            "admitted_requests": engine.admitted,
            "weight_version": engine.weights.label,
            # /v1/score: "prefill" (one pass) or "forcing" (why in scoring_reason)
            "scoring": engine.scoring, "scoring_reason": engine.scoring_reason,
            # clients size their batches by these (StepzipClient splits beyond them)
            "max_problems": state.settings.max_problems, "max_n": state.settings.max_n}


@router.get("/metrics", response_class=PlainTextResponse, responses=documented(401))
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)

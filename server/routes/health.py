"""Liveness/readiness, model list and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.engine
    state = request.app.state
    if state.startup_error is not None:
        return JSONResponse({"status": "failed", "error": state.startup_error}, status_code=503)
    if engine.dead:
        return JSONResponse({"status": "dead", "error": "engine died"}, status_code=503)
    if not engine.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return {"status": "ok", "model": engine.model_name, "processor": engine.processor,
            "startup_s": engine.startup_s,
            "unfinished_requests": engine.llm.get_num_unfinished_requests(),
            "weight_version": state.weight_version}


@router.get("/v1/models")
async def models(request: Request):
    engine = request.app.state.engine
    return {"object": "list", "data": [{
        "id": engine.model_name, "object": "model", "created": int(engine.started_at or time.time()),
        "owned_by": "stepzip", "root": engine.model_path, "max_model_len": engine.max_model_len,
        "weight_version": request.app.state.weight_version,
    }]}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)

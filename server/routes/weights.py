"""Weight updates (off unless the server starts with --enable-weight-routes; behind the
API key when one is set). All or nothing: the version reported by /v1/models and /health
changes only once new weights are fully in, and every failure releases the weight gate.

- POST /v1/weights/load {path}: reload a safetensors checkpoint folder in place (CPU and
  GPU). Before anything touches the engine: the folder and every file in it must really
  lie under a --weights-root (symlinks resolved), the headers must parse, and a dry run of
  the model's own loader must find every parameter, no unknown tensor and matching
  shapes. A load that still fails half-way reloads the previous checkpoint.
- TRL's NCCL sync routes (/init_weight_transfer_engine, /start_weight_update,
  /update_weights, /finish_weight_update), forwarded to the engine, for GPU users; the
  helpers TRL reads without moving weights (/get_world_size, /server_info,
  /reset_prefix_cache) answer even without --enable-weight-routes. A failed step answers 409 and releases the gate;
  a failed update or finish reloads the last checkpoint folder.

Both take the weight gate exclusively (see server/weightgate.py): in-flight generations
finish on the old weights, new ones wait for the new weights.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Request

from server.checkpoint import CheckpointError, read_checkpoint, resolve_folder
from server.engine.engine import WeightLoadError
from server.errors import ApiError, documented, documented_vllm, invalid
from server.routes.deps import ready_engine
from stepzip.schemas.openai import WeightsLoadRequest, WeightsLoadResponse

router = APIRouter(tags=["weights"])


def _enabled(request: Request):
    if not request.app.state.settings.enable_weight_routes:
        raise ApiError(404, "weight routes are disabled; start with --enable-weight-routes")
    return ready_engine(request)


def allowed_roots(settings) -> list[Path]:
    if not settings.weights_root:
        return []
    return [Path(p).resolve() for p in settings.weights_root.split(os.pathsep) if p]


def checked_checkpoint(settings, raw: str) -> tuple[Path, list[tuple[str, list[int], str]]]:
    """The folder and its tensors, or the 4xx that says why it cannot be loaded."""
    roots = allowed_roots(settings)
    if not roots:
        raise ApiError(403, "no --weights-root is configured", "path",
                       "the server accepts no checkpoint paths")
    try:
        folder = resolve_folder(raw, roots)
        return folder, read_checkpoint(folder, roots)
    except PermissionError as exc:
        raise ApiError(403, str(exc), "path", "must lie under a --weights-root folder") from exc
    except (CheckpointError, OSError) as exc:
        raise invalid("path", str(exc)) from exc


@router.post("/v1/weights/load", response_model=WeightsLoadResponse,
             responses=documented(401, 403, 404, 413, 422, 503))
async def load_weights(req: WeightsLoadRequest, request: Request) -> WeightsLoadResponse:
    engine = _enabled(request)
    state = request.app.state
    folder, tensors = await asyncio.to_thread(checked_checkpoint, state.settings, req.path)
    problems = await engine.check_checkpoint(tensors)
    if problems:
        raise invalid("path", f"does not fit the served model: {'; '.join(problems)}")
    started = time.perf_counter()
    async with state.gate.exclusive():
        try:
            version = await engine.reload_weights(str(folder), checksum=req.checksum)
        except WeightLoadError as exc:  # the previous weights are back in place
            raise invalid("path", f"could not load (previous weights restored): {exc}") \
                from exc
    return WeightsLoadResponse(version=version.label, checksum=version.checksum,
                               seconds=time.perf_counter() - started, path=str(folder))


# ---- TRL's NCCL weight-sync surface (GPU) ----------------------------------------------

TRANSFER_ERRORS = documented_vllm(400, 401, 404, 409, 503)


@router.get("/get_world_size", responses=TRANSFER_ERRORS)
async def get_world_size(request: Request):
    engine = ready_engine(request)  # TRL reads it; no weights move
    s = engine.settings
    return {"world_size": s.tensor_parallel_size * s.data_parallel_size}


@router.get("/server_info", responses=TRANSFER_ERRORS)
async def server_info(request: Request, config_format: str = "json"):
    """vLLM's dev route shape: TRL reads nested keys (weight_transfer_config,
    model_config.logprobs_mode, parallel_config.data_parallel_size, lora_config)."""
    import pydantic
    from vllm.config import VllmConfig

    engine = ready_engine(request)  # TRL reads it; no weights move
    config = engine.vllm_config
    dumped = (str(config) if config_format == "text" else pydantic.TypeAdapter(VllmConfig)
              .dump_python(config, mode="json", fallback=str))
    return {"vllm_config": dumped, "weight_version": engine.weights.label}


@router.post("/init_weight_transfer_engine", responses=TRANSFER_ERRORS)
async def init_weight_transfer_engine(request: Request, body: dict[str, Any] = Body(...)):
    engine = _enabled(request)
    payload = _payload(body, "init_info", "WeightTransferInitRequest")
    await _transfer(engine, engine.init_weight_transfer_engine(payload))
    return {}


@router.post("/start_weight_update", responses=TRANSFER_ERRORS)
async def start_weight_update(request: Request):
    engine = _enabled(request)
    hold = request.app.state.gate_hold
    await hold.start(request.app.state.gate)  # held until /finish_weight_update
    try:
        await _transfer(engine, engine.start_weight_update())
    except BaseException:
        await hold.stop()
        raise
    return {}


@router.post("/update_weights", responses=TRANSFER_ERRORS)
async def update_weights(request: Request, body: dict[str, Any] = Body(...)):
    engine = _enabled(request)
    payload = _payload(body, "update_info", "WeightTransferUpdateRequest")
    await _within_update(request, engine, engine.update_weights(payload))
    return {}


@router.post("/finish_weight_update", responses=TRANSFER_ERRORS)
async def finish_weight_update(request: Request):
    engine = _enabled(request)
    await _within_update(request, engine, engine.finish_weight_update())
    await request.app.state.gate_hold.stop()
    return {"version": engine.weights.label}


@router.post("/reset_prefix_cache", responses=TRANSFER_ERRORS)
async def reset_prefix_cache(request: Request):
    engine = ready_engine(request)  # TRL reads it; no weights move
    await engine.reset_prefix_cache()
    return {}


async def _within_update(request: Request, engine, call) -> None:
    """Run a step of a started update; if it fails the weights may be half-written:
    reload the last checkpoint folder, then release the gate."""
    hold = request.app.state.gate_hold
    if not hold.held:
        call.close()
        raise ApiError(409, "no weight update in progress; call /start_weight_update first")
    try:
        await _transfer(engine, call)
    except BaseException:
        try:
            await engine.restore_weights()
        finally:
            await hold.stop()
        raise


async def _transfer(engine, call) -> None:
    try:
        await call
    except ApiError:
        raise
    except (TypeError, ValueError) as exc:
        raise invalid("body", str(exc)) from exc
    except Exception as exc:
        if engine.dead:
            raise
        raise ApiError(409, f"weight transfer failed: {type(exc).__name__}: {exc}") from exc


def _payload(body: dict, key: str, request_cls: str):
    """The JSON body's `key` object in vLLM's request dataclass."""
    from vllm.distributed.weight_transfer import base

    payload = body.get(key)
    if not isinstance(payload, dict):
        raise invalid(key, f"expected an object under {key!r}")
    try:
        return getattr(base, request_cls)(**{key: payload})
    except (TypeError, ValueError) as exc:
        raise invalid(key, str(exc)) from exc

"""Weight routes (off unless the server starts with --enable-weight-routes; behind the
API key when one is set): POST /v1/weights/load and TRL's NCCL sync routes
(/init_weight_transfer_engine, /start_weight_update, /update_weights,
/finish_weight_update), each one call into server/services/weights.py. The helpers TRL
reads without moving weights (/get_world_size, /server_info, /reset_prefix_cache)
answer even without --enable-weight-routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request

from server.errors import ApiError, documented, documented_vllm, invalid
from server.routes.deps import ready_engine
from server.services.weights import WeightService
from stepzip.schemas.openai import WeightsLoadRequest, WeightsLoadResponse

router = APIRouter(tags=["weights"])
TRANSFER_ERRORS = documented_vllm(400, 401, 404, 409, 503)


def _service(request: Request) -> WeightService:
    if not request.app.state.settings.enable_weight_routes:
        raise ApiError(404, "weight routes are disabled; start with --enable-weight-routes")
    ready_engine(request)
    return request.app.state.weights


@router.post("/v1/weights/load", response_model=WeightsLoadResponse,
             responses=documented(401, 403, 404, 413, 422, 503))
async def load_weights(req: WeightsLoadRequest, request: Request) -> WeightsLoadResponse:
    return await _service(request).load(req.path, req.checksum)


@router.post("/init_weight_transfer_engine", responses=TRANSFER_ERRORS)
async def init_weight_transfer_engine(request: Request, body: dict[str, Any] = Body(...)):
    service = _service(request)
    await service.init_transfer(_payload(body, "init_info", "WeightTransferInitRequest"))
    return {}


@router.post("/start_weight_update", responses=TRANSFER_ERRORS)
async def start_weight_update(request: Request):
    await _service(request).start_update()
    return {}


@router.post("/update_weights", responses=TRANSFER_ERRORS)
async def update_weights(request: Request, body: dict[str, Any] = Body(...)):
    service = _service(request)
    await service.update(_payload(body, "update_info", "WeightTransferUpdateRequest"))
    return {}


@router.post("/finish_weight_update", responses=TRANSFER_ERRORS)
async def finish_weight_update(request: Request):
    return {"version": await _service(request).finish_update()}


# ---- helpers TRL reads; no weights move -----------------------------------------------

@router.get("/get_world_size", responses=TRANSFER_ERRORS)
async def get_world_size(request: Request):
    s = ready_engine(request).settings
    return {"world_size": s.tensor_parallel_size * s.data_parallel_size}


@router.get("/server_info", responses=TRANSFER_ERRORS)
async def server_info(request: Request, config_format: str = "json"):
    """vLLM's dev route shape: TRL reads nested keys (weight_transfer_config,
    model_config.logprobs_mode, parallel_config.data_parallel_size, lora_config)."""
    import pydantic
    from vllm.config import VllmConfig

    engine = ready_engine(request)
    config = engine.vllm_config
    dumped = (str(config) if config_format == "text" else pydantic.TypeAdapter(VllmConfig)
              .dump_python(config, mode="json", fallback=str))
    return {"vllm_config": dumped, "weight_version": engine.weights.label}


@router.post("/reset_prefix_cache", responses=TRANSFER_ERRORS)
async def reset_prefix_cache(request: Request):
    await ready_engine(request).reset_prefix_cache()
    return {}


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

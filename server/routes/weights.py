"""Weight updates (off unless the server starts with --enable-weight-routes; behind the
API key when one is set).

- POST /v1/weights/load {path}: reload a safetensors checkpoint folder in place (CPU and
  GPU); the path must lie under a --weights-root folder.
- TRL's NCCL sync routes (/get_world_size, /server_info, /init_weight_transfer_engine,
  /start_weight_update, /update_weights, /finish_weight_update, /reset_prefix_cache),
  forwarded to AsyncLLM's methods, for GPU users.

Both take the weight gate exclusively (see server/weightgate.py): in-flight generations
finish on the old weights, new ones wait for the new weights.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Request

from server.errors import ApiError, invalid
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


def checked_path(settings, raw: str) -> Path:
    path = Path(raw).expanduser().resolve()
    roots = allowed_roots(settings)
    if not roots:
        raise ApiError(403, "no --weights-root is configured", "path",
                       "the server accepts no checkpoint paths")
    if not any(path == root or root in path.parents for root in roots):
        raise ApiError(403, f"path {raw!r} is outside the allowed weights roots", "path",
                       "must lie under a --weights-root folder")
    if not path.is_dir():
        raise invalid("path", f"{raw!r} is not a folder")
    if not any(path.glob("*.safetensors")):
        raise invalid("path", f"{raw!r} holds no *.safetensors file")
    return path


@router.post("/v1/weights/load", response_model=WeightsLoadResponse)
async def load_weights(req: WeightsLoadRequest, request: Request) -> WeightsLoadResponse:
    engine = _enabled(request)
    state = request.app.state
    path = checked_path(state.settings, req.path)
    started = time.perf_counter()
    async with state.gate.exclusive():
        try:
            await engine.llm.collective_rpc("reload_weights",
                                            kwargs={"weights_path": str(path)})
        except Exception as exc:  # wrong architecture/shapes: the old weights stay
            raise invalid("path", f"could not load: {type(exc).__name__}: {exc}") from exc
        await engine.llm.reset_prefix_cache()
        checksum = await weights_checksum(engine) if req.checksum else None
        state.weight_version_n += 1
        state.weight_version = f"v{state.weight_version_n}"
        if checksum:
            state.weight_version += f"-{checksum[:8]}"
    return WeightsLoadResponse(version=state.weight_version, checksum=checksum,
                               seconds=time.perf_counter() - started, path=str(path))


async def weights_checksum(engine) -> str:
    """sha256 over the engine's own per-tensor digests (what is loaded, not the files)."""
    per_worker = await engine.llm.compute_weight_checksums()
    digest = hashlib.sha256()
    for name, value in sorted(per_worker[0].items()):
        digest.update(f"{name}={value};".encode())
    return digest.hexdigest()


# ---- TRL's NCCL weight-sync surface (GPU) ----------------------------------------------

@router.get("/get_world_size")
async def get_world_size(request: Request):
    engine = _enabled(request)
    s = engine.settings
    return {"world_size": s.tensor_parallel_size * s.data_parallel_size}


@router.get("/server_info")
async def server_info(request: Request, config_format: str = "json"):
    """vLLM's dev route shape: TRL reads nested keys (weight_transfer_config,
    model_config.logprobs_mode, parallel_config.data_parallel_size, lora_config)."""
    import pydantic
    from vllm.config import VllmConfig

    config = _enabled(request).llm.vllm_config
    dumped = (str(config) if config_format == "text" else pydantic.TypeAdapter(VllmConfig)
              .dump_python(config, mode="json", fallback=str))
    return {"vllm_config": dumped, "weight_version": request.app.state.weight_version}


@router.post("/init_weight_transfer_engine")
async def init_weight_transfer_engine(request: Request, body: dict[str, Any] = Body(...)):
    engine = _enabled(request)
    return await _forward(engine.llm.init_weight_transfer_engine, body, "init_info",
                          "WeightTransferInitRequest")


@router.post("/start_weight_update")
async def start_weight_update(request: Request):
    engine = _enabled(request)
    state = request.app.state
    await state.gate_hold.start(state.gate)  # held until /finish_weight_update
    await engine.llm.start_weight_update()
    return {}


@router.post("/update_weights")
async def update_weights(request: Request, body: dict[str, Any] = Body(...)):
    engine = _enabled(request)
    return await _forward(engine.llm.update_weights, body, "update_info",
                          "WeightTransferUpdateRequest")


@router.post("/finish_weight_update")
async def finish_weight_update(request: Request):
    engine = _enabled(request)
    state = request.app.state
    state.weight_version_n += 1
    state.weight_version = f"v{state.weight_version_n}"
    try:
        await engine.llm.finish_weight_update(weight_version=state.weight_version)
        await engine.llm.reset_prefix_cache()
    finally:
        await state.gate_hold.stop()
    return {"version": state.weight_version}


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request):
    engine = _enabled(request)
    await engine.llm.reset_prefix_cache()
    return {}


async def _forward(method, body: dict, key: str, request_cls: str):
    """Wrap the JSON body's `key` object in vLLM's request dataclass and call `method`."""
    from vllm.distributed.weight_transfer import base

    payload = body.get(key)
    if not isinstance(payload, dict):
        raise invalid(key, f"expected an object under {key!r}")
    try:
        await method(getattr(base, request_cls)(**{key: payload}))
    except (TypeError, ValueError) as exc:
        raise invalid(key, str(exc)) from exc
    return {}

"""The routes `vllm serve` answers, with its shapes and errors: /v1/completions,
/v1/chat/completions (plus the opt-in `stepzip` object), /v1/models, /tokenize,
/detokenize, /version, /ping, /load. Each validates (vLLM's request models) and calls
the OpenAI service once."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.serve.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

from server.errors import documented_vllm
from server.routes.deps import ready_engine, unless_disconnected
from server.services.openai import ChatCompletionRequest, CompletionRequest, OpenAIService

router = APIRouter(tags=["openai"])

_GENERATION_ERRORS = documented_vllm(400, 404, 503)


def service(request: Request) -> OpenAIService:
    ready_engine(request)  # 503 while starting or after the engine died
    return request.app.state.openai


def _answer(result) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


@router.post("/v1/completions", responses={
    200: {"model": CompletionResponse, "content": {"text/event-stream": {}}},
    **_GENERATION_ERRORS})
async def completions(req: CompletionRequest, request: Request):
    # a client that goes away cancels the call, and vLLM aborts its engine requests
    return _answer(await unless_disconnected(
        request, service(request).create_completion(req, request)))


@router.post("/v1/chat/completions", responses={
    200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}},
    **_GENERATION_ERRORS})
async def chat_completions(req: ChatCompletionRequest, request: Request):
    return _answer(await unless_disconnected(
        request, service(request).create_chat_completion(req, request)))


@router.get("/v1/models", responses=documented_vllm(503))
async def models(request: Request):
    return await service(request).list_models()


@router.post("/tokenize", response_model=TokenizeResponse,
             responses=documented_vllm(400, 404, 503))
async def tokenize(req: TokenizeRequest, request: Request):
    return JSONResponse(await service(request).tokenize(req, request))


@router.post("/detokenize", response_model=DetokenizeResponse,
             responses=documented_vllm(400, 404, 503))
async def detokenize(req: DetokenizeRequest, request: Request):
    return JSONResponse(await service(request).detokenize(req, request))


@router.get("/version")
async def version():
    from vllm import __version__

    return {"version": __version__}


@router.get("/ping", response_class=Response, responses=documented_vllm(503))
async def ping(request: Request):
    """SageMaker-style liveness, as vLLM answers it: 200 with an empty body when ready."""
    ready_engine(request)
    return Response(status_code=200)


@router.post("/ping", response_class=Response, responses=documented_vllm(503))
async def ping_post(request: Request):
    return await ping(request)


@router.get("/load", responses=documented_vllm(503))
async def load(request: Request):
    """Requests the engine has not finished (vLLM counts in-flight HTTP requests)."""
    return {"server_load": ready_engine(request).unfinished_requests()}

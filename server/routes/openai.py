"""POST /v1/completions and /v1/chat/completions in vLLM's/OpenAI's shapes (what TRL's
VLLMClient and the OpenAI SDK send), with the opt-in `stepzip` extension per choice."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server import generation as gen
from server.errors import ApiError, invalid
from server.routes.deps import ready_engine, unless_disconnected
from stepzip.schemas.openai import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)

router = APIRouter(tags=["openai"])


def _check_common(request: Request, req) -> None:
    engine = ready_engine(request)
    settings = request.app.state.settings
    if req.model not in (None, engine.model_name, engine.model_path):
        raise model_not_found(req.model)
    if req.n > settings.max_n:
        raise invalid("n", f"at most {settings.max_n}, got {req.n}")
    if req.seed is not None and engine.seed_unsafe:
        raise invalid("seed", "seeded sampling is unavailable on this CPU server because it "
                      "runs with chunked prefill (restart without --chunked-prefill)")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"model {model!r} is not served here", "model",
                    "see GET /v1/models")


@router.post("/v1/completions", response_model=CompletionResponse,
             response_model_exclude_none=True)
async def completions(req: CompletionRequest, request: Request):
    _check_common(request, req)
    engine, state = request.app.state.engine, request.app.state
    prompts = req.prompts()
    if len(prompts) * req.n > state.settings.max_n * max(1, state.settings.max_problems):
        raise invalid("prompt", "too many prompts x n for one request")
    jobs = gen.build_jobs(engine, prompts, req, max_tokens=req.max_tokens,
                          logprobs=req.logprobs)
    delimiter = state.settings.step_delimiter
    if req.stream:
        return StreamingResponse(_stream_completions(request, req, jobs, delimiter),
                                 media_type="text/event-stream")
    results = await unless_disconnected(request, gen.run_jobs(engine, state.gate, jobs))
    choices = []
    for job, g in zip(jobs, results):
        choices.append(CompletionChoice(
            index=job.index, text=g.text, finish_reason=g.finish_reason,
            stop_reason=g.stop_reason,
            logprobs=gen.completion_logprobs(engine, g, req.return_tokens_as_token_ids)
            if req.logprobs is not None else None,
            prompt_token_ids=g.prompt_token_ids if req.return_token_ids else None,
            token_ids=g.token_ids if req.return_token_ids else None,
            stepzip=gen.stepzip_fields(engine, req.stepzip, g, delimiter)))
    usage = _usage(jobs, results, req.n)
    _count(state, usage)
    return CompletionResponse(id=gen.new_id("cmpl"), created=gen.now(), model=engine.model_name,
                              choices=choices, usage=usage)


def render_chat(engine, req: ChatCompletionRequest) -> list[int]:
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = engine.tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=req.chat_template,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}))
    except ValueError as exc:
        raise invalid("messages", str(exc)) from exc
    except Exception as exc:  # jinja errors in a user-supplied template
        raise invalid("chat_template", f"{type(exc).__name__}: {exc}") from exc
    return engine.tokenizer.encode(prompt, add_special_tokens=False)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             response_model_exclude_none=True)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    _check_common(request, req)
    engine, state = request.app.state.engine, request.app.state
    prompt_ids = render_chat(engine, req)
    top_n = req.top_logprobs or 0
    jobs = gen.build_jobs(engine, [prompt_ids], req,
                          max_tokens=req.max_completion_tokens or req.max_tokens,
                          logprobs=top_n if req.logprobs else None)
    delimiter = state.settings.step_delimiter
    if req.stream:
        return StreamingResponse(_stream_chat(request, req, jobs, delimiter),
                                 media_type="text/event-stream")
    results = await unless_disconnected(request, gen.run_jobs(engine, state.gate, jobs))
    choices = [ChatChoice(
        index=job.index, message=ChatMessageOut(content=g.text),
        finish_reason=g.finish_reason, stop_reason=g.stop_reason,
        logprobs=gen.chat_logprobs(engine, g, top_n, req.return_tokens_as_token_ids)
        if req.logprobs else None,
        token_ids=g.token_ids if req.return_token_ids else None,
        stepzip=gen.stepzip_fields(engine, req.stepzip, g, delimiter))
        for job, g in zip(jobs, results)]
    usage = _usage(jobs, results, req.n)
    _count(state, usage)
    return ChatCompletionResponse(
        id=gen.new_id("chatcmpl"), created=gen.now(), model=engine.model_name, choices=choices,
        usage=usage, prompt_token_ids=prompt_ids if req.return_token_ids else None)


def _usage(jobs, results, n: int) -> Usage:
    prompt = sum(len(g.prompt_token_ids) for j, g in zip(jobs, results) if j.index % n == 0)
    completion = sum(len(g.token_ids) for g in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def _count(state, usage: Usage) -> None:
    state.metrics.prompt_tokens.inc(usage.prompt_tokens)
    state.metrics.completion_tokens.inc(usage.completion_tokens)


async def _stream_completions(request: Request, req: CompletionRequest, jobs, delimiter):
    engine, state = request.app.state.engine, request.app.state
    rid, created = gen.new_id("cmpl"), gen.now()
    finals = {}
    try:
        async for job, delta, out, final in gen.stream_jobs(engine, state.gate, jobs):
            choice = {"index": job.index, "text": delta, "logprobs": None,
                      "finish_reason": None}
            if final is not None:
                finals[job.index] = (job, final)
                choice["finish_reason"] = final.finish_reason
                choice["stop_reason"] = final.stop_reason
                if req.return_token_ids:
                    choice["token_ids"] = final.token_ids
                    choice["prompt_token_ids"] = final.prompt_token_ids
                sz = gen.stepzip_fields(engine, req.stepzip, final, delimiter)
                if sz is not None:
                    choice["stepzip"] = sz.model_dump(exclude_none=True)
            elif not delta:
                continue
            yield gen.sse({"id": rid, "object": "text_completion", "created": created,
                           "model": engine.model_name, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            jobs_, gens = zip(*[finals[i] for i in sorted(finals)])
            usage = _usage(jobs_, gens, req.n)
            _count(state, usage)
            yield gen.sse({"id": rid, "object": "text_completion", "created": created,
                           "model": engine.model_name, "choices": [],
                           "usage": usage.model_dump()})
    except Exception as exc:  # headers are sent: report in-band, as vLLM does
        yield gen.sse({"error": {"message": f"{type(exc).__name__}: {exc}", "code": 500}})
    yield gen.sse("[DONE]")


async def _stream_chat(request: Request, req: ChatCompletionRequest, jobs, delimiter):
    engine, state = request.app.state.engine, request.app.state
    rid, created = gen.new_id("chatcmpl"), gen.now()
    started: set[int] = set()
    finals = {}
    base = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": engine.model_name}
    try:
        async for job, delta, out, final in gen.stream_jobs(engine, state.gate, jobs):
            if job.index not in started:
                started.add(job.index)
                yield gen.sse({**base, "choices": [{"index": job.index, "delta": {
                    "role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]})
            if delta:
                yield gen.sse({**base, "choices": [{"index": job.index, "delta": {
                    "content": delta}, "logprobs": None, "finish_reason": None}]})
            if final is not None:
                finals[job.index] = (job, final)
                choice = {"index": job.index, "delta": {}, "logprobs": None,
                          "finish_reason": final.finish_reason}
                sz = gen.stepzip_fields(engine, req.stepzip, final, delimiter)
                if sz is not None:
                    choice["stepzip"] = sz.model_dump(exclude_none=True)
                if req.return_token_ids:
                    choice["token_ids"] = final.token_ids
                yield gen.sse({**base, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            jobs_, gens = zip(*[finals[i] for i in sorted(finals)])
            usage = _usage(jobs_, gens, req.n)
            _count(state, usage)
            yield gen.sse({**base, "choices": [], "usage": usage.model_dump()})
    except Exception as exc:
        yield gen.sse({"error": {"message": f"{type(exc).__name__}: {exc}", "code": 500}})
    yield gen.sse("[DONE]")

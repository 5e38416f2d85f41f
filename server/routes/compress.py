"""POST /v1/compress: problems in, reasoning with step entropies and compressed variants out."""

from __future__ import annotations

from fastapi import APIRouter, Request

from stepzip.schemas import compress as schemas
from server.errors import invalid
from server.routes.deps import ready_engine, unless_disconnected

router = APIRouter(tags=["compress"])


@router.post("/v1/compress", response_model=schemas.CompressResponse)
async def compress(req: schemas.CompressRequest, request: Request) -> schemas.CompressResponse:
    engine = ready_engine(request)
    settings = request.app.state.settings
    if len(req.problems) > settings.max_problems:
        raise invalid("problems", f"at most {settings.max_problems} problems per request, "
                                  f"got {len(req.problems)}")
    if req.sampling.n > settings.max_n:
        raise invalid("sampling.n", f"at most {settings.max_n}, got {req.sampling.n}")
    for field, value in (("sampling.max_tokens", req.sampling.max_tokens),
                         ("answer_max_tokens", req.answer_max_tokens)):
        if value >= engine.max_model_len:
            raise invalid(field, f"{value} exceeds the model length ({engine.max_model_len})")
    if req.sampling.seed is not None and engine.seed_unsafe:
        raise invalid("sampling.seed", "seeded sampling is unavailable on this CPU server "
                      "because it runs with chunked prefill (restart without --chunked-prefill)")
    try:  # vLLM's own checks, before anything is submitted
        engine.sampling_params(max_tokens=req.sampling.max_tokens,
                               temperature=req.sampling.temperature, top_p=req.sampling.top_p,
                               top_k=req.sampling.top_k, seed=req.sampling.seed)
    except ValueError as exc:
        raise invalid("sampling", str(exc)) from exc
    compressor = request.app.state.compressor
    for i, p in enumerate(req.problems):
        n_prompt = len(compressor.encode(compressor.style.reasoning_prompt(
            engine.tokenizer, p.text, req.prompt_template, req.system)))
        if n_prompt + req.sampling.max_tokens > engine.max_model_len:
            raise invalid(f"problems.{i}.text",
                          f"prompt ({n_prompt} tokens) + max_tokens ({req.sampling.max_tokens}) "
                          f"exceeds the model length ({engine.max_model_len})")
    async with request.app.state.gate.generation():
        response = await unless_disconnected(request, compressor.run(req))
    metrics = request.app.state.metrics
    metrics.prompt_tokens.inc(response.usage.prompt_tokens)
    metrics.completion_tokens.inc(response.usage.completion_tokens + response.usage.answer_tokens)
    for problem in response.results:
        for trace in problem.traces:
            for v in trace.variants:
                metrics.reduction.labels(v.strategy).observe(v.reduction)
    return response

"""The OpenAI-compatible service: completions, chat, models, tokenize, as `vllm serve`.

Requests are vLLM 0.32's own request models (every field, default and validation of
`vllm serve`) plus the opt-in `stepzip` object, and are answered by vLLM's own serving
objects over `StepzipEngineClient`, so shapes, streaming deltas, logprobs, structured
outputs, reasoning parsers and error bodies are vLLM's. This service adds what stepzip
owns: the weight gate around generation, stepzip's own limits, the per-choice `stepzip`
fields (on the final chunk when streaming) and token metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from fastapi import Request
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatCompletionRequest,
)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest as VllmCompletionRequest,
)
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.v1.engine.exceptions import EngineDeadError

from server.engine.client import ChoiceSink, current_sink
from server.engine.entropy import INTERNAL_KEY_PREFIX
from server.errors import ApiError, invalid
from stepzip.prompts import style_for
from stepzip.rewards import count_skips, skip_ratio
from stepzip.schemas.compress import StepOut
from stepzip.schemas.openai import ChoiceStepzip, StepzipOptions
from stepzip.steps import reasoning_span, segment, token_char_offsets
from stepzip.tokens import token_pieces


class CompletionRequest(VllmCompletionRequest):
    stepzip: StepzipOptions | None = None


class ChatCompletionRequest(VllmChatCompletionRequest):
    stepzip: StepzipOptions | None = None


@dataclass
class _StepzipWork:
    """The `stepzip` fields of one request's choices, filled as samples finish."""

    options: StepzipOptions
    n: int
    fields: dict[int, dict] = field(default_factory=dict)


class OpenAIService:
    """One per server; built once the engine is up."""

    def __init__(self, engine, state):
        self.engine, self.state = engine, state
        settings = state.settings
        client = engine.openai_client()
        reasoning_parser = client.vllm_config.structured_outputs_config.reasoning_parser
        self.models = OpenAIServingModels(
            engine_client=client,
            base_model_paths=[BaseModelPath(name=engine.model_name,
                                            model_path=engine.model_path)])
        template = {"chat_template": None, "chat_template_content_format": "auto",
                    "trust_request_chat_template": settings.trust_request_chat_template}
        renderer = OnlineRenderer(client.model_config, client.renderer, request_logger=None,
                                  reasoning_parser=reasoning_parser, **template)
        renderer.warmup()
        self.completion = OpenAIServingCompletion(client, self.models,
                                                  online_renderer=renderer,
                                                  request_logger=None)
        self.chat = OpenAIServingChat(client, self.models, "assistant",
                                      online_renderer=renderer, request_logger=None,
                                      reasoning_parser=reasoning_parser or "", **template)
        self.tokenization = ServingTokenization(self.models, renderer, **template)

    # ---- routes' entry points ------------------------------------------------------
    async def create_completion(self, req: CompletionRequest, raw_request: Request):
        return await self._generate(self.completion.create_completion, req, raw_request)

    async def create_chat_completion(self, req: ChatCompletionRequest, raw_request: Request):
        return await self._generate(self.chat.create_chat_completion, req, raw_request)

    async def tokenize(self, req: TokenizeRequest, raw_request: Request) -> dict:
        return _unwrap(await _vllm_call(self.tokenization.create_tokenize(req, raw_request)))

    async def detokenize(self, req: DetokenizeRequest, raw_request: Request) -> dict:
        return _unwrap(await _vllm_call(
            self.tokenization.create_detokenize(req, raw_request)))

    async def list_models(self) -> dict:
        """vLLM's model list, plus the current weight version of each model."""
        listing = (await self.models.show_available_models()).model_dump()
        for card in listing["data"]:
            card["weight_version"] = self.state.engine.weights.label
        return listing

    # ---- generation ----------------------------------------------------------------
    async def _generate(self, create, req, raw_request: Request):
        """Returns a JSON-ready dict, or an async iterator of SSE lines."""
        self._check_limits(req)
        work = _StepzipWork(req.stepzip, req.n or 1) if req.stepzip is not None else None
        engine_requests = _prompt_count(req) * (req.n or 1)
        token = current_sink.set(self._sink(work) if work else None)
        try:
            if req.stream:  # vLLM schedules on first iteration: gate and admission there
                with self.engine.admission(engine_requests):
                    pass  # refuse now, while a status code can still be sent
                result = await _vllm_call(create(req, raw_request))
            else:
                with self.engine.admission(engine_requests):
                    async with self.state.gate.generation():
                        result = await _vllm_call(create(req, raw_request))
        finally:
            current_sink.reset(token)
        if isinstance(result, ErrorResponse):
            raise ApiError.from_vllm(result)
        if isinstance(result, (CompletionResponse, ChatCompletionResponse)):
            body = result.model_dump()
            if work is not None:
                for choice in body["choices"]:
                    choice["stepzip"] = work.fields.get(choice["index"])
            self._count(body.get("usage"))
            return body
        return self._stream(result, work, raw_request, engine_requests)

    def _check_limits(self, req) -> None:
        """stepzip's own limits; everything else is vLLM's validation."""
        settings = self.state.settings
        n = req.n or 1
        if n > settings.max_n:
            raise invalid("n", f"at most {settings.max_n}, got {n}")
        if req.seed is not None and self.engine.seed_unsafe:
            raise invalid("seed", "seeded sampling is unavailable on this CPU server because "
                          "it runs with chunked prefill (restart without --chunked-prefill)")
        if getattr(req, "chat_template", None) and not settings.trust_request_chat_template:
            raise invalid("chat_template", "request chat templates are refused unless the "
                          "server runs with --trust-request-chat-template")
        if req.stepzip is not None and req.use_beam_search:
            raise invalid("stepzip", "not available with use_beam_search")
        if req.logit_bias and not all(math.isfinite(v) for v in req.logit_bias.values()):
            raise invalid("logit_bias", "values must be finite numbers")  # vLLM takes NaN
        _refuse_internal_keys(req)
        self._check_prompt_text(req)

    def _check_prompt_text(self, req) -> None:
        """Name the field where vLLM's tokenizer would only say what it choked on."""
        if isinstance(req, ChatCompletionRequest):
            texts = [("messages", part) for m in req.messages for part in _message_texts(m)]
        else:
            prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
            texts = [("prompt", p) for p in prompts if isinstance(p, str)]
            ids = [t for p in prompts if isinstance(p, (int, list))
                   for t in (p if isinstance(p, list) else [p])]
            vocab = len(self.engine.tokenizer)
            if ids and max(ids) >= vocab:
                raise invalid("prompt", f"token id {max(ids)} is out of the vocabulary "
                              f"(size {vocab})")
        for name, text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise invalid(name, f"not valid Unicode text ({exc.reason} at character "
                              f"{exc.start})") from exc

    def _sink(self, work: _StepzipWork) -> ChoiceSink:
        opts, default_delimiter = work.options, self.state.settings.step_delimiter

        async def finish(prompt_index: int, sample: int, token_ids: list[int],
                         entropies: list[float] | None) -> None:
            fields = await self.engine.in_tokenizer_thread(
                stepzip_fields, self.engine.tokenizer, opts, token_ids, entropies,
                default_delimiter, self.engine.decode_many)
            work.fields[prompt_index * work.n + sample] = fields

        return ChoiceSink(entropy=opts.entropies or opts.steps, finish=finish)

    async def _stream(self, lines, work: _StepzipWork | None, raw_request: Request,
                      engine_requests: int):
        with self.engine.admission(engine_requests):
            async with self.state.gate.generation():
                async for line in lines:
                    if work is not None and '"finish_reason":"' in line:
                        line = _with_stepzip(line, work)
                    yield line
        metadata = getattr(raw_request.state, "request_metadata", None)
        usage = getattr(metadata, "final_usage_info", None)
        self._count(usage.model_dump() if usage is not None else None)

    def _count(self, usage: dict | None) -> None:
        if usage:
            self.state.metrics.prompt_tokens.inc(usage["prompt_tokens"])
            self.state.metrics.completion_tokens.inc(usage["completion_tokens"] or 0)


def _refuse_internal_keys(req) -> None:
    """`vllm_xargs` becomes `SamplingParams.extra_args`, where stepzip's processors read
    their keys: a client's would force the emitted tokens or claim entropy entries."""
    for key in req.vllm_xargs or {}:
        if key.startswith(INTERNAL_KEY_PREFIX):
            raise invalid(f"vllm_xargs.{key}", f"keys starting {INTERNAL_KEY_PREFIX!r} are "
                          "reserved for stepzip's own engine requests")


def _message_texts(message) -> list[str]:
    """The text of a chat message (a string, or the text parts of a content list)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict)
                and isinstance(p.get("text"), str)]
    return []


def _prompt_count(req) -> int:
    """Engine requests per sample: one per prompt (a completion may batch prompts)."""
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _with_stepzip(line: str, work: _StepzipWork) -> str:
    """Add the `stepzip` fields to the chunk that finishes a choice."""
    payload = json.loads(line[len("data: "):])
    for choice in payload.get("choices", ()):
        if choice.get("finish_reason") is not None:
            choice["stepzip"] = work.fields.get(choice["index"])
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _vllm_call(call):
    """Await a vLLM serving call; the client errors vLLM raises (rather than returns)
    become the 400s `vllm serve`'s exception handlers make of them. Engine death and
    server errors propagate to the app's handlers."""
    try:
        return await call
    except Exception as exc:
        if isinstance(exc, (ApiError, EngineDeadError)):
            raise
        response = create_error_response(exc)
        if response.error.code >= 500:
            raise
        raise ApiError.from_vllm(response) from exc


def _unwrap(result) -> dict:
    if isinstance(result, ErrorResponse):
        raise ApiError.from_vllm(result)
    return result.model_dump()


def stepzip_fields(tokenizer, opts: StepzipOptions, token_ids: list[int],
                   entropies: list[float] | None, default_delimiter: str,
                   decode_many=None) -> dict:
    """The per-choice `stepzip` object: entropies, steps and skip statistics, from one
    segmentation of the decoded completion. CPU work: run it in a worker thread."""
    delimiter = opts.delimiter or default_delimiter
    pieces = token_pieces(lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                          token_ids, decode_many)
    text = "".join(pieces)
    out = ChoiceStepzip()
    if entropies is not None:
        out.entropy_total = float(math.fsum(entropies))
        if opts.entropies:
            out.entropies = entropies
    if text:
        start, end = reasoning_span(text, thinking=style_for(tokenizer).thinking)
        out.n_skips = count_skips(text, marker=opts.marker)
        out.skip_ratio = skip_ratio(text[start:end], out.n_skips, delimiter=delimiter,
                                    marker=opts.marker)
        steps = segment(text, token_char_offsets(pieces), entropies, delimiter=delimiter,
                        span=(start, end))
        out.n_steps = len(steps)
        if opts.steps:
            out.steps = [StepOut.from_step(s) for s in steps]
    return out.model_dump(exclude_none=True)

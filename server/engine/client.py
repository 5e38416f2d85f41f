"""The engine client that vLLM's own OpenAI serving classes talk to.

stepzip answers /v1/completions and /v1/chat/completions with vLLM's serving objects
(`OpenAIServingCompletion`, `OpenAIServingChat`), so request fields, defaults, validation,
response shapes, streaming and errors are vLLM's. They call `engine_client.generate(...)`
once per prompt; this proxy forwards every call to `AsyncLLM` unchanged, except while a
request carries the `stepzip` object (a `ChoiceSink` set in `current_sink`): then a
prompt's n samples run as n engine requests, each with its own entropy key (vLLM's own
`n` clones one `SamplingParams`, so children would share the key), seeded as vLLM seeds
its children (sample k gets seed + k: the same samples as `vllm serve`), and each
finished sample is handed to the sink before its last output reaches the serving object.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from copy import copy
from dataclasses import dataclass, field

from server.engine.entropy import EXTRA_ARGS_KEY


@dataclass
class ChoiceSink:
    """One HTTP request's stepzip work: `finish(prompt_index, sample, token_ids,
    entropies)` runs when a sample ends; `entropy` says whether to compute entropies."""

    entropy: bool
    finish: Callable[[int, int, list[int], list[float] | None], Awaitable[None]]
    prompts_seen: int = field(default=0)


current_sink: contextvars.ContextVar[ChoiceSink | None] = contextvars.ContextVar(
    "stepzip_choice_sink", default=None)


class StepzipEngineClient:
    """Delegates to `AsyncLLM`; `generate` fans a stepzip request out per sample."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine.llm, name)

    def generate(self, prompt, sampling_params, request_id: str, **kwargs):
        # A plain function: the sink is read when the serving object schedules the
        # request (inside the route's context), not when the generator first runs.
        sink = current_sink.get()
        if sink is None:
            return self._engine.llm.generate(prompt, sampling_params, request_id, **kwargs)
        prompt_index = sink.prompts_seen
        sink.prompts_seen += 1
        return self._fan_out(sink, prompt_index, prompt, sampling_params, request_id, kwargs)

    async def _fan_out(self, sink: ChoiceSink, prompt_index: int, prompt, params,
                       request_id: str, kwargs: dict) -> AsyncGenerator:
        from vllm.sampling_params import RequestOutputKind
        from vllm.utils.async_utils import merge_async_iterators

        n = params.n
        children = [self._sample(sink, prompt_index, k, prompt, params, request_id, kwargs)
                    for k in range(n)]
        if params.output_kind != RequestOutputKind.FINAL_ONLY:
            async for _, out in merge_async_iterators(*children):
                out.request_id = request_id
                yield out
            return
        finals = [None] * n
        async for k, out in merge_async_iterators(*children):
            finals[k] = out
        merged = finals[0]  # prompt fields are the same for every sample
        merged.request_id = request_id
        merged.outputs = [f.outputs[0] for f in finals]
        merged.finished = True
        yield merged

    async def _sample(self, sink: ChoiceSink, prompt_index: int, k: int, prompt, params,
                      request_id: str, kwargs: dict) -> AsyncGenerator:
        from vllm.sampling_params import RequestOutputKind

        engine = self._engine
        child_id = f"{k}_{request_id}"
        child = copy(params)
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + k  # vLLM's rule for the children of n > 1
        entropy = sink.entropy and engine.settings.entropy
        # Request ids may come from the client (X-Request-Id); entropy keys must not collide.
        key = f"sz-{uuid.uuid4().hex}"
        if entropy:
            child.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: key}
        delta = params.output_kind == RequestOutputKind.DELTA
        token_ids: list[int] = []
        finished = False
        try:
            async for out in engine.llm.generate(prompt, child, child_id, **kwargs):
                comp = out.outputs[0]
                comp.index = k
                if delta:
                    token_ids.extend(comp.token_ids)
                else:  # FINAL_ONLY and CUMULATIVE outputs carry every token so far
                    token_ids = list(comp.token_ids)
                if out.finished:
                    finished = True
                    entropies = (await engine.entropies(key, len(token_ids))
                                 if entropy else None)
                    await sink.finish(prompt_index, k, token_ids, entropies)
                yield out
        finally:
            if entropy and not finished:
                await engine.fetcher.release([key])

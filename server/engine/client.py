"""The engine client that vLLM's own OpenAI serving classes talk to.

stepzip answers /v1/completions and /v1/chat/completions with vLLM's serving objects
(`OpenAIServingCompletion`, `OpenAIServingChat`), so request fields, defaults, validation,
response shapes, streaming and errors are vLLM's. They call `engine_client.generate(...)`
once per prompt; this proxy forwards every call to `AsyncLLM` unchanged, except while a
request carries the `stepzip` object (a `ChoiceSink` set in `current_sink`): then the
prompt's request carries an entropy key, and each finished sample is handed to the sink
before its last output reaches the serving object.

n > 1 stays ONE engine request with vLLM's own parallel sampling (one prompt prefill,
vLLM's scheduling, its child seeds), with one entropy key per child: vLLM builds each
child's SamplingParams in `ParentRequest._get_child_sampling_params` as a shallow copy of
the parent's (shared by every child when unseeded), so `install_child_keys` wraps that
method to give child i the key `<key>#i`.
"""

from __future__ import annotations

import asyncio
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


def child_key(key: str, n: int, index: int) -> str:
    """Entropy key of sample `index` of a request keyed `key` with n samples."""
    return key if n == 1 else f"{key}#{index}"


def install_child_keys() -> None:
    """Give each child of an n > 1 request its own entropy key (see the module doc).
    Idempotent; raises when vLLM's ParentRequest no longer has the method (a vLLM other
    than 0.32 needs checking)."""
    from vllm.v1.engine.parallel_sampling import ParentRequest

    original = getattr(ParentRequest, "_get_child_sampling_params", None)
    if original is None:
        raise RuntimeError("vllm.v1.engine.parallel_sampling.ParentRequest has no "
                           "_get_child_sampling_params (stepzip supports vLLM 0.32.x)")
    if getattr(original, "stepzip_child_keys", False):
        return

    def with_child_key(self, index: int):
        params = original(self, index)
        key = (self.sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if key is None:
            return params
        params = copy(params)  # vLLM may cache one clone for every unseeded child
        params.extra_args = {**params.extra_args,
                             EXTRA_ARGS_KEY: child_key(key, self.sampling_params.n, index)}
        return params

    with_child_key.stepzip_child_keys = True
    ParentRequest._get_child_sampling_params = with_child_key


class StepzipEngineClient:
    """Delegates to `AsyncLLM`; `generate` keys a stepzip request's samples."""

    def __init__(self, engine):
        self._engine = engine
        install_child_keys()

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
        return self._keyed(sink, prompt_index, prompt, sampling_params, request_id, kwargs)

    async def _keyed(self, sink: ChoiceSink, prompt_index: int, prompt, params,
                     request_id: str, kwargs: dict) -> AsyncGenerator:
        """One engine request (vLLM's n children); each sample's entropies fetched as it
        finishes, before its last output reaches the serving object."""
        from vllm.sampling_params import RequestOutputKind

        engine = self._engine
        n = params.n
        entropy = sink.entropy and engine.settings.entropy
        # Request ids may come from the client (X-Request-Id); entropy keys must not collide.
        key = f"sz-{uuid.uuid4().hex}"
        if entropy:
            params = copy(params)
            params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: key}
        delta = params.output_kind == RequestOutputKind.DELTA
        token_ids: dict[int, list[int]] = {k: [] for k in range(n)}
        pending = set(range(n))  # samples not finished yet
        try:
            async for out in engine.llm.generate(prompt, params, request_id, **kwargs):
                finished = []
                for comp in out.outputs:
                    k = comp.index
                    if delta:
                        token_ids[k].extend(comp.token_ids)
                    else:  # FINAL_ONLY and CUMULATIVE outputs carry every token so far
                        token_ids[k] = list(comp.token_ids)
                    if comp.finish_reason is not None and k in pending:
                        pending.discard(k)
                        finished.append(k)
                if finished:
                    # All at once: the fetcher coalesces them into one engine RPC (awaited
                    # one by one, each child cost an RPC between engine steps).
                    entropies = (await asyncio.gather(*(
                        engine.entropies(child_key(key, n, k), len(token_ids[k]))
                        for k in finished)) if entropy else [None] * len(finished))
                    await asyncio.gather(*(sink.finish(prompt_index, k, token_ids[k], e)
                                           for k, e in zip(finished, entropies, strict=True)))
                yield out
        finally:
            if entropy and pending:
                await engine.fetcher.release([child_key(key, n, k) for k in pending])

"""The engine: vLLM's AsyncLLM plus the entropy processor, the worker extension and a
batched entropy fetcher.

One `Engine` per server process. `generate()` runs one request (n = 1; callers submit n
requests, each with its own entropy key) and returns its tokens, text and, when asked,
one entropy per returned token, fetched with one `collective_rpc` per batch of requests
that finished together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engine.entropy import EXTRA_ARGS_KEY
from stepzip.modelcache import resolve_model
from server.settings import ServerSettings

log = logging.getLogger("stepzip.engine")

PROCESSOR_V1 = "server.engine.processor_v1:EntropyProcessorV1"
PROCESSOR_V2 = "server.engine.processor_v2:EntropyProcessorV2"
WORKER_EXTENSION = "server.engine.worker_ext.StepzipWorkerExtension"


def cpu_dtype() -> str:
    """bfloat16 where the CPU computes it natively, else float32 (emulated bf16 is slow)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


class EntropyUnavailable(RuntimeError):
    """The engine returned no (or incomplete) entropies for a request."""


@dataclass
class Generation:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: int | str | None = None
    entropies: list[float] | None = None
    logprobs: list | None = None
    seconds: float = 0.0
    entropy_fetch_s: float = 0.0


@dataclass
class _Pending:
    key: str
    n: int
    future: asyncio.Future = field(repr=False)


class EntropyFetcher:
    """Coalesces entropy reads of requests finishing together into one collective_rpc."""

    def __init__(self, llm):
        self.llm = llm
        self.pending: list[_Pending] = []
        self.draining: asyncio.Task | None = None
        self.rpc_calls = 0
        self.observe = None  # optional callback(seconds) per RPC, for metrics

    async def fetch(self, key: str, n: int) -> list[float] | None:
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(key, n, future))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # let requests finishing in the same engine step join
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                started = time.perf_counter()
                results = await self.llm.collective_rpc(
                    "stepzip_fetch_entropies", args=([(p.key, p.n) for p in batch],))
                self.rpc_calls += 1
                if self.observe is not None:
                    self.observe(time.perf_counter() - started)
                first = results[0]  # every TP rank computes the same values; take rank 0
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(first.get(p.key))
            except Exception as exc:  # engine dead or RPC failed: fail these requests only
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def release(self, keys: list[str]) -> None:
        try:
            await self.llm.collective_rpc("stepzip_release_entropies", args=(keys,))
        except Exception:  # best effort: the engine may be gone
            log.debug("release of %d entropy keys failed", len(keys), exc_info=True)


class Engine:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.llm = None
        self.tokenizer = None
        self.fetcher: EntropyFetcher | None = None
        self.model_path: str | None = None
        self.model_name: str = settings.served_model_name or settings.model
        self.max_model_len = settings.max_model_len
        self.processor: str | None = None
        self.seed_unsafe = False
        self.ready = False
        self.started_at: float | None = None
        self.startup_s: float | None = None

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        started = time.perf_counter()
        self.model_path = await asyncio.to_thread(resolve_model, self.settings.model)
        if self.settings.served_model_name is None:
            self.model_name = (
                "SmolLM2-135M-Instruct" if self.settings.model in ("default", "", None)
                else self.settings.model)
        self.llm = await asyncio.to_thread(self._build_llm)
        self.tokenizer = self.llm.get_tokenizer()
        self.fetcher = EntropyFetcher(self.llm)
        self.ready = True
        self.started_at = time.time()
        self.startup_s = time.perf_counter() - started
        log.info("engine ready in %.1f s (%s, processor %s)", self.startup_s, self.model_path,
                 self.processor)

    def _build_llm(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(s.kv_cache_gib or 2)))
        chunked = s.chunked_prefill if s.chunked_prefill is not None else not on_cpu
        # vLLM's CPU sampler cannot rewind a seeded request's generator after a chunked
        # prefill step and kills the engine; routes refuse `seed` when this is set.
        self.seed_unsafe = on_cpu and chunked
        kwargs = dict(
            model=self.model_path,
            served_model_name=[self.model_name],
            dtype=cpu_dtype() if (on_cpu and s.dtype == "auto") else s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            tensor_parallel_size=s.tensor_parallel_size,
            data_parallel_size=s.data_parallel_size,
            enforce_eager=s.enforce_eager,
            seed=s.seed,
            enable_chunked_prefill=chunked,
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
        )
        if not chunked:
            # Without chunking a prompt must fit one step's token budget.
            kwargs["max_num_batched_tokens"] = max(s.max_model_len, 8192)
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
            if s.kv_cache_gib:
                kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2**30)
        if s.entropy:
            kwargs["logits_processors"] = [PROCESSOR_V1]
        kwargs.update(s.extra_engine_args)
        engine_args = AsyncEngineArgs(**kwargs)
        vllm_config = engine_args.create_engine_config()
        if s.entropy:
            # The two runners load different processor interfaces; pick the one this
            # configuration will actually run.
            use_v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
            self.processor = PROCESSOR_V2 if use_v2 else PROCESSOR_V1
            vllm_config.model_config.logits_processors = [self.processor]
        self.max_model_len = vllm_config.model_config.max_model_len
        return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True)

    async def shutdown(self) -> None:
        self.ready = False
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None

    @property
    def dead(self) -> bool:
        return self.llm is not None and bool(getattr(self.llm, "errored", False))

    # ---- generation ----------------------------------------------------------------
    def sampling_params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(**kw)

    async def stream(self, prompt: str | list[int], params, *, entropy: bool = True,
                     request_id: str | None = None) -> AsyncIterator:
        """Yield vLLM RequestOutputs (cumulative) for one request; entropies not included."""
        request_id = request_id or f"sz-{uuid.uuid4().hex}"
        if entropy and self.settings.entropy:
            params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: request_id}
        engine_prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
        finished = False
        try:
            async for out in self.llm.generate(engine_prompt, params, request_id):
                finished = out.finished
                yield out
        finally:
            if not finished and entropy and self.settings.entropy:
                await self.fetcher.release([request_id])

    async def generate(self, prompt: str | list[int], params, *, entropy: bool = True,
                       request_id: str | None = None) -> Generation:
        from vllm.sampling_params import RequestOutputKind

        request_id = request_id or f"sz-{uuid.uuid4().hex}"
        started = time.perf_counter()
        # Only the final output is wanted: vLLM then skips per-step output objects (as its
        # own server does for non-streaming requests).
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for out in self.stream(prompt, params, entropy=entropy, request_id=request_id):
            final = out
        done = time.perf_counter()
        comp = final.outputs[0]
        gen = Generation(
            request_id=request_id,
            prompt_token_ids=list(final.prompt_token_ids or []),
            token_ids=list(comp.token_ids),
            text=comp.text,
            finish_reason=comp.finish_reason,
            stop_reason=comp.stop_reason,
            logprobs=comp.logprobs,
        )
        if entropy and self.settings.entropy:
            gen.entropies = await self.entropies(request_id, len(gen.token_ids))
        gen.seconds = time.perf_counter() - started
        gen.entropy_fetch_s = time.perf_counter() - done
        return gen

    async def entropies(self, key: str, n: int) -> list[float]:
        values = await self.fetcher.fetch(key, n)
        if values is None or len(values) != n:
            raise EntropyUnavailable(f"no entropies for request {key}")
        if n and any(math.isnan(v) for v in values):
            missing = [i for i, v in enumerate(values) if math.isnan(v)]
            raise EntropyUnavailable(f"request {key}: positions {missing[:8]} never written")
        return values

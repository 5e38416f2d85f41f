"""The engine: vLLM's AsyncLLM plus the entropy processor, the worker extension and a
batched entropy fetcher.

One `Engine` per server process. `generate()` runs one request (n = 1; callers submit n
requests, each with its own entropy key) and returns its tokens, text and, when asked,
one entropy per returned token, fetched with one `collective_rpc` per batch of requests
that finished together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.engine.compat import check_processor_interface, prefill_problems
from server.engine.entropy import EXTRA_ARGS_KEY
from server.engine.forcing import teacher_forcing
from server.engine.placement import keep_frontend_off_workers
from server.engine.prefill import given_logprobs, prefill_request
from server.settings import ServerSettings
from stepzip.modelcache import resolve_model
from stepzip.tokens import batch_decoder

log = logging.getLogger("stepzip.engine")

PROCESSOR_V1 = "server.engine.processor_v1:EntropyProcessorV1"
PROCESSOR_V2 = "server.engine.processor_v2:EntropyProcessorV2"
# Teacher forcing for /v1/score; registered after the entropy processor (see forcing.py).
FORCING_V1 = "server.engine.forcing:ForcingProcessorV1"
FORCING_V2 = "server.engine.forcing:ForcingProcessorV2"


# vLLM's CPU default is 128-token KV blocks: a prompt shorter than a block is never in the
# prefix cache, so each of a rollout's n siblings prefills it again. 32 (the smallest the
# CPU attention backend takes without a warning) lets them share it. --engine-arg
# block_size=N overrides.
CPU_BLOCK_SIZE = 32


def logits_processors(use_v2: bool) -> list[str]:
    """Entropy before forcing: vLLM applies custom processors in list order, so the
    entropy is of the model's own (unforced) distribution."""
    return [PROCESSOR_V2, FORCING_V2] if use_v2 else [PROCESSOR_V1, FORCING_V1]


WORKER_EXTENSION = "server.engine.worker_ext.StepzipWorkerExtension"
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()  # what vLLM reports for an emptied parameter


def cpu_dtype() -> str:
    """bfloat16 where the CPU computes it natively, else float32 (emulated bf16 is slow)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


ENGINE_STOP_S = 2.0


class EntropyUnavailable(RuntimeError):
    """The engine returned no (or incomplete) entropies for a request."""


class EngineOverloaded(RuntimeError):
    """Admitting a request would exceed `max_pending_requests` engine requests."""


class WeightLoadError(RuntimeError):
    """A checkpoint failed to load; the previous weights are back in place."""


@dataclass
class WeightVersion:
    """Which weights serve, on every engine: bumped only once new weights are fully in
    everywhere, and left alone when a failed update puts these weights back."""
    n: int = 0
    # The folder these weights were loaded from: what a failed update reloads. None after
    # an NCCL transfer (no folder holds them): workers then keep a host copy during the
    # next update instead.
    path: str | None = None

    @property
    def label(self) -> str:
        return f"v{self.n}"


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


async def rpc_every_worker(llm, method: str, *args) -> list:
    """`collective_rpc(method, args=args)` on every worker of every data-parallel engine.

    vLLM 0.32's `AsyncLLM.collective_rpc` goes through the engine client's
    `call_utility_async`, which under data parallelism (DPLBAsyncMPClient) asks every
    engine but returns engine 0's workers only; `call_utility_all_async` returns them all.
    """
    core = getattr(llm, "engine_core", None)
    if hasattr(core, "call_utility_all_async"):
        per_engine = await core.call_utility_all_async("collective_rpc", method, None,
                                                        args, None)
        return [worker for workers in per_engine for worker in workers]
    return await llm.collective_rpc(method, args=args)


def merge_worker_entropies(
        results: list[dict[str, list[float] | None]]) -> dict[str, list[float] | None]:
    """Per key, the copy of the worker that sampled it: the one with the fewest unwritten
    (NaN) positions. A request is sampled by one data-parallel engine, on its last
    pipeline stage, by the tensor-parallel rank holding its batch share (or by all ranks
    alike); the other workers hold no entry (None) or one never written (NaN)."""
    if len(results) == 1:
        return results[0]
    merged: dict[str, list[float] | None] = {}
    for worker in results:
        for key, values in worker.items():
            best = merged.get(key)
            if values is not None and (best is None or _unwritten(values) < _unwritten(best)):
                merged[key] = values
            else:
                merged.setdefault(key, best)
    return merged


def _unwritten(values: list[float]) -> int:
    return sum(1 for v in values if math.isnan(v))


def one_engine_digests(per_worker: list[dict[str, str]]) -> dict[str, str]:
    """vLLM's per-tensor digests of every worker (names prefixed `dp{i}:pp..:tp..:`), with
    the data-parallel engine dropped from the names: each engine must hold the same."""
    engines: dict[str, dict[str, str]] = {}
    for worker in per_worker:
        for name, value in worker.items():
            engine, _, rest = name.partition(":")
            engines.setdefault(engine, {})[rest] = value
    first, *others = engines.values()
    for engine, digests in zip(list(engines)[1:], others):
        if digests != first:
            differ = sorted(n for n in first if digests.get(n) != first[n])
            raise RuntimeError(f"data-parallel engine {engine} holds other weights than "
                               f"{next(iter(engines))}: {differ[:5]}")
    return first


class EntropyFetcher:
    """Coalesces entropy reads of requests finishing together into one collective_rpc."""

    def __init__(self, llm):
        self.llm = llm
        self.pending: list[_Pending] = []
        self.draining: asyncio.Task | None = None
        self.rpc_calls = 0
        self.observe = None  # optional callback(seconds) per RPC, for metrics
        self.on_evictions = None  # optional callback(count) of newly reported evictions
        self.evictions: dict[int, int] = {}  # per data-parallel engine, as last reported

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
                results = await rpc_every_worker(
                    self.llm, "stepzip_fetch_entropies", [(p.key, p.n) for p in batch])
                self.rpc_calls += 1
                if self.observe is not None:
                    self.observe(time.perf_counter() - started)
                merged = merge_worker_entropies([entropies for entropies, _ in results])
                self._count_evictions([evictions for _, evictions in results])
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(merged.get(p.key))
            except Exception as exc:  # noqa: BLE001 -- engine dead or RPC failed: fail these requests only
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _count_evictions(self, reports: list[tuple[int, int]]) -> None:
        """Workers report (data-parallel engine, evictions so far). Tensor-parallel ranks
        that all sample evict the same keys, so an engine counts its highest report once."""
        before = sum(self.evictions.values())
        for engine, count in reports:
            self.evictions[engine] = max(self.evictions.get(engine, 0), count)
        added = sum(self.evictions.values()) - before
        if added and self.on_evictions is not None:
            self.on_evictions(added)

    async def release(self, keys: list[str]) -> None:
        try:
            await rpc_every_worker(self.llm, "stepzip_release_entropies", keys)
        except Exception:  # best effort: the engine may be gone
            log.debug("release of %d entropy keys failed", len(keys), exc_info=True)


class Engine:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.llm = None
        self.tokenizer = None
        self.decode_many = None
        self.fetcher: EntropyFetcher | None = None
        self.model_path: str | None = None
        self.model_name: str = settings.served_model_name or settings.model
        self.max_model_len = settings.max_model_len
        self.processor: str | None = None
        # How /v1/score gets given tokens' entropies: "prefill" (one pass, prefill.py),
        # "forcing" (one decode step per token, forcing.py) or None (no entropies).
        self.scoring: str | None = None
        self.scoring_reason: str | None = None  # why "forcing"
        self.seed_unsafe = False
        self.on_cpu = False
        self.ready = False
        self.started_at: float | None = None
        self.startup_s: float | None = None
        self.weights = WeightVersion()
        self.admitted = 0  # engine requests admitted by `admission`, running or queued
        # One thread for tokenizer work (templating, encode/decode): off the event loop,
        # and serial, since a fast tokenizer refuses concurrent use ("Already borrowed").
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="stepzip-tokenizer")

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
        self.decode_many = batch_decoder(self.tokenizer)  # None: token_pieces decodes alone
        self.fetcher = EntropyFetcher(self.llm)
        if self.settings.entropy:
            self.scoring = await self._install_prefill_scoring()
        self.weights = WeightVersion(path=self.model_path)
        if self.settings.pin_frontend and self.on_cpu:
            try:
                placements = await rpc_every_worker(self.llm, "stepzip_cpu_placement")
                log.info("%s", keep_frontend_off_workers(placements))
            except Exception:  # a speed-up only: serve unpinned
                log.warning("could not pin the API and engine-core processes; serving "
                            "unpinned", exc_info=True)
        self.ready = True
        self.started_at = time.time()
        self.startup_s = time.perf_counter() - started
        log.info("engine ready in %.1f s (%s, processor %s)", self.startup_s, self.model_path,
                 self.processor)

    async def _install_prefill_scoring(self) -> str:
        """"prefill" when every worker scores /v1/score requests by one prefill pass, else
        "forcing" (said in the log and /health): nothing half-installed is used."""
        problems = prefill_problems(use_v2=self.processor == PROCESSOR_V2)
        if not problems:
            per_worker = await rpc_every_worker(self.llm, "stepzip_install_prefill_scoring")
            problems = sorted({p for worker in per_worker for p in worker})
        if problems:
            self.scoring_reason = "; ".join(problems)
            log.warning("/v1/score teacher-forces one decode step per token (prefill "
                        "scoring unavailable: %s)", self.scoring_reason)
            return "forcing"
        log.info("/v1/score scores given tokens by one prefill pass")
        return "prefill"

    def _build_llm(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        on_cpu = self.on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(s.kv_cache_gib or 2)))
        chunked = s.chunked_prefill if s.chunked_prefill is not None else not on_cpu
        # vLLM's CPU sampler cannot rewind a seeded request's generator after a chunked
        # prefill step and kills the engine; routes refuse `seed` when this is set.
        self.seed_unsafe = on_cpu and chunked
        kwargs = {
            "model": self.model_path,
            "served_model_name": [self.model_name],
            "dtype": cpu_dtype() if (on_cpu and s.dtype == "auto") else s.dtype,
            "max_model_len": s.max_model_len,
            "max_num_seqs": s.max_num_seqs,
            "tensor_parallel_size": s.tensor_parallel_size,
            "data_parallel_size": s.data_parallel_size,
            "pipeline_parallel_size": s.pipeline_parallel_size,
            "distributed_executor_backend": s.distributed_executor_backend,
            "enforce_eager": s.enforce_eager,
            "seed": s.seed,
            "enable_chunked_prefill": chunked,
            "worker_extension_cls": WORKER_EXTENSION,
            "disable_log_stats": True,
            "logprobs_mode": s.logprobs_mode,
            "max_logprobs": s.max_logprobs,
        }
        if s.reasoning_parser:
            kwargs["reasoning_parser"] = s.reasoning_parser
        if not chunked:
            # Without chunking a prompt must fit one step's token budget.
            kwargs["max_num_batched_tokens"] = max(s.max_model_len, 8192)
        if on_cpu:
            kwargs["block_size"] = CPU_BLOCK_SIZE
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
            if s.kv_cache_gib:
                kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2**30)
        if s.entropy:
            kwargs["logits_processors"] = logits_processors(use_v2=False)
        kwargs.update(s.extra_engine_args)
        engine_args = AsyncEngineArgs(**kwargs)
        vllm_config = engine_args.create_engine_config()
        if s.entropy:
            # The two runners load different processor interfaces; pick the one this
            # configuration will actually run.
            use_v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
            check_processor_interface(use_v2)  # fail here, not with misread rows later
            self.processor = PROCESSOR_V2 if use_v2 else PROCESSOR_V1
            vllm_config.model_config.logits_processors = logits_processors(use_v2)
        self.max_model_len = vllm_config.model_config.max_model_len
        return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True)

    async def shutdown(self) -> None:
        self.ready = False
        if self.llm is not None:
            # vLLM's default gives the engine core 5 s, then kills it; its requests are
            # aborted already, so 2 s keep a SIGTERM's whole stop near 10 s.
            await asyncio.to_thread(self.llm.shutdown, ENGINE_STOP_S)
            self.llm = None

    @property
    def dead(self) -> bool:
        return self.llm is not None and bool(getattr(self.llm, "errored", False))

    async def watch_death(self, on_death, interval: float = 0.25) -> None:
        """Call `on_death()` once the engine core has died (vLLM's client notices a
        dead core process within its own monitor's poll)."""
        while not self.dead:
            await asyncio.sleep(interval)
        on_death()

    @contextlib.contextmanager
    def admission(self, n: int):
        """Reserve `n` engine requests for one HTTP request, or refuse it at once."""
        limit = self.settings.max_pending_requests
        if self.admitted + n > limit:
            raise EngineOverloaded(f"{self.admitted} engine requests are pending (limit "
                                   f"{limit}); this request needs {n}")
        self.admitted += n
        try:
            yield
        finally:
            self.admitted -= n

    async def in_tokenizer_thread(self, fn, *args):
        """Run CPU-bound tokenizer work `fn(*args)` off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    # ---- the façade the routes use (they never touch `llm`) ------------------------
    def unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def openai_client(self):
        """The engine client vLLM's OpenAI serving objects run on (server/engine/client.py)."""
        from server.engine.client import StepzipEngineClient

        return StepzipEngineClient(self)

    @property
    def vllm_config(self):
        return self.llm.vllm_config

    async def reset_prefix_cache(self) -> None:
        await self.llm.reset_prefix_cache()

    async def checksum(self) -> str:
        """sha256 over the engine's own per-tensor digests of what is loaded (every worker
        of one engine; every data-parallel engine must hold the same). vLLM's CPU backend
        packs linear weights into its GEMM kernels and empties the parameters, so its
        digests miss them; there, the checksum is of the weight files of the folder
        loaded (a load is all or nothing)."""
        per_worker = await self.llm.compute_weight_checksums()
        digests = one_engine_digests(per_worker)
        if self.weights.path is not None and EMPTY_DIGEST in digests.values():
            from server.checkpoint import checkpoint_digest

            return await asyncio.to_thread(checkpoint_digest, self.weights.path)
        digest = hashlib.sha256()
        for name, value in sorted(digests.items()):
            digest.update(f"{name}={value};".encode())
        return digest.hexdigest()

    async def check_checkpoint(self, tensors: list[tuple[str, list[int], str]]) -> list[str]:
        """Problems a load of these tensors would hit, found by a dry run in every worker
        of every data-parallel engine."""
        per_worker = await rpc_every_worker(self.llm, "stepzip_check_checkpoint", tensors)
        return sorted({p for problems in per_worker for p in problems})

    async def reload_weights(self, path: str) -> WeightVersion:
        """Load a checkpoint folder in place on every worker of every engine, all or
        nothing: if any worker fails, every worker gets the last good weights back (those
        that succeeded too) and WeightLoadError is raised; the version moves only when all
        succeeded."""
        await self._keep_last_good()
        try:
            errors = await rpc_every_worker(self.llm, "stepzip_reload_weights", path)
        except Exception:
            await self.restore_weights()
            raise
        failed = [e for e in errors if e]
        if failed:
            await self.restore_weights()
            raise WeightLoadError(f"{len(failed)} of {len(errors)} workers failed: {failed[0]}")
        await self._forget_last_good()
        await self.llm.reset_prefix_cache()
        self.weights = WeightVersion(self.weights.n + 1, path)
        return self.weights

    async def restore_weights(self) -> None:
        """Put the last good weights back on every worker (after a failed load, transfer
        or timed-out update): reloaded from their folder, or from the host copy taken
        when the update began if they came from a transfer. The version stays: it names
        these weights."""
        await rpc_every_worker(self.llm, "stepzip_restore_weights", self.weights.path)
        await self.llm.reset_prefix_cache()

    async def _keep_last_good(self) -> None:
        """Weights no folder holds (an NCCL transfer's) are copied to host memory before
        anything overwrites them; weights from a folder are reloaded from it instead."""
        if self.weights.path is None:
            await rpc_every_worker(self.llm, "stepzip_snapshot_weights")

    async def _forget_last_good(self) -> None:
        if self.weights.path is None:
            await rpc_every_worker(self.llm, "stepzip_drop_snapshot")

    async def init_weight_transfer_engine(self, request) -> None:
        await self.llm.init_weight_transfer_engine(request)

    async def start_weight_update(self) -> None:
        await self._keep_last_good()
        await self.llm.start_weight_update()

    async def update_weights(self, request) -> None:
        await self.llm.update_weights(request)

    async def finish_weight_update(self) -> WeightVersion:
        """Commit an NCCL transfer: the new weights have no folder, so until the next
        load, an update keeps a host copy of them to restore."""
        new = WeightVersion(self.weights.n + 1, None)
        await self.llm.finish_weight_update(weight_version=new.label)
        await self._forget_last_good()
        await self.llm.reset_prefix_cache()
        self.weights = new
        return new

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

    async def score(self, prompt_ids: list[int], token_ids: list[int], *,
                    logprobs: bool = False) -> Generation:
        """`token_ids` after `prompt_ids`, teacher-forced: one entropy per given token,
        and with `logprobs` each given token's logprob under the model's own (unforced)
        distribution, in `Generation.logprobs` as vLLM's per-position dicts. Forcing
        cannot give logprobs (the forced logit makes every one 0): callers refuse that."""
        if self.scoring != "prefill":
            if logprobs:
                raise ValueError("given tokens' logprobs need prefill scoring")
            params = self.sampling_params(**teacher_forcing(token_ids))
            return await self.generate(prompt_ids, params, entropy=True)
        from vllm.sampling_params import RequestOutputKind

        key = f"sz-{uuid.uuid4().hex}"
        prompt, kwargs = prefill_request(key, prompt_ids, token_ids, logprobs)
        params = self.sampling_params(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)
        started = time.perf_counter()
        final = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt}, params, key):
                final = out
        finally:
            if final is None or not final.finished:
                await self.fetcher.release([key])
        done = time.perf_counter()
        # text: callers decode the given ids themselves (the engine detokenized nothing)
        gen = Generation(request_id=key, prompt_token_ids=list(prompt_ids),
                         token_ids=list(token_ids), text="", finish_reason=None,
                         logprobs=given_logprobs(final.prompt_logprobs, len(token_ids))
                         if logprobs else None)
        gen.entropies = await self.entropies(key, len(token_ids))
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

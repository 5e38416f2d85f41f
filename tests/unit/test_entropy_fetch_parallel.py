"""Entropy fetch under data / pipeline / tensor parallelism, through vLLM 0.32's own
engine-client classes.

`AsyncLLM.collective_rpc` -> `DPLBAsyncMPClient.call_utility_async`, which asks every
data-parallel engine but returns engine 0's answer only. Here the engines' ZMQ round trip
(`_call_utility_async`) answers with what each engine's workers' stores would return, so
vLLM's own routing code runs unchanged; `rpc_every_worker` must still reach engine 1's
requests.
"""

from __future__ import annotations

import asyncio
import math

from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.core_client import DPLBAsyncMPClient

from server.engine.engine import EntropyFetcher, merge_worker_entropies, rpc_every_worker

NAN = math.nan


def dp_llm(engine_workers: dict[bytes, list[dict]],
           evictions: dict[bytes, list[int]] | None = None) -> tuple[AsyncLLM, list]:
    """An AsyncLLM over vLLM's DPLBAsyncMPClient whose engines answer with the given
    per-worker fetch results (and per-worker eviction counts, default 0); returns it and
    the log of (engine, method, args) calls."""
    calls: list = []
    evictions = evictions or {}
    client = object.__new__(DPLBAsyncMPClient)
    client.core_engines = list(engine_workers)
    client.core_engine = client.core_engines[0]

    async def round_trip(method, *args, engine):  # what the engine process would answer
        assert method == "collective_rpc"
        rpc_method, _timeout, rpc_args, _kwargs = args
        calls.append((engine, rpc_method, rpc_args))
        if rpc_method == "stepzip_release_entropies":
            return [len(rpc_args[0])] * len(engine_workers[engine])
        wanted = [key for key, _ in rpc_args[0]]
        rank = client.core_engines.index(engine)
        counts = evictions.get(engine, [0] * len(engine_workers[engine]))
        return [({k: w.get(k) for k in wanted}, (rank, count))
                for w, count in zip(engine_workers[engine], counts, strict=True)]

    client._call_utility_async = round_trip
    client.shutdown = lambda timeout=None: None  # no engine processes to stop
    llm = object.__new__(AsyncLLM)
    llm.engine_core = client
    return llm, calls


def test_vllm_collective_rpc_returns_engine_0_only_but_every_worker_is_reached():
    engines = {b"\x00\x00": [{"a": [0.5, 0.25]}], b"\x01\x00": [{"b": [1.0]}]}
    llm, calls = dp_llm(engines)

    async def go():
        plain = await llm.collective_rpc("stepzip_fetch_entropies", args=([("b", 1)],))
        every = await rpc_every_worker(llm, "stepzip_fetch_entropies", [("a", 2), ("b", 1)])
        return plain, every

    plain, every = asyncio.run(go())
    assert plain == [({"b": None}, (0, 0))]  # the request served by engine 1 is lost so
    assert [entropies for entropies, _ in every] == [{"a": [0.5, 0.25], "b": None},
                                                     {"a": None, "b": [1.0]}]
    assert {engine for engine, _, _ in calls} == set(engines)


def test_fetcher_returns_each_requests_entropies_from_the_engine_that_sampled_it():
    # engine 0: two pipeline stages, only the last sampled (the first holds NaNs);
    # engine 1: two tensor-parallel ranks with batch-sharded sampling.
    engines = {
        b"\x00\x00": [{"r0": [NAN, NAN]}, {"r0": [0.1, 0.2]}],
        b"\x01\x00": [{"r1": [0.3]}, {"r2": [0.4, 0.5, 0.6]}],
    }
    llm, calls = dp_llm(engines)
    fetcher = EntropyFetcher(llm)

    async def go():
        got = await asyncio.gather(fetcher.fetch("r0", 2), fetcher.fetch("r1", 1),
                                   fetcher.fetch("r2", 3))
        await fetcher.release(["gone"])
        return got

    assert asyncio.run(go()) == [[0.1, 0.2], [0.3], [0.4, 0.5, 0.6]]
    assert fetcher.rpc_calls == 1  # one batched RPC for the three requests
    released = [engine for engine, method, _ in calls if method == "stepzip_release_entropies"]
    assert sorted(released) == sorted(engines)  # aborts free entries on every engine


def test_merge_prefers_the_fully_written_copy_and_keeps_unknown_keys():
    merged = merge_worker_entropies([
        {"a": [NAN, 1.0], "b": None, "c": None},
        {"a": [2.0, 1.0], "b": [NAN], "c": None},
        {"a": [NAN, NAN], "b": None, "c": None},
    ])
    assert merged["a"] == [2.0, 1.0]
    assert math.isnan(merged["b"][0])  # incomplete, so Engine.entropies reports positions
    assert merged["c"] is None


def test_fetcher_counts_each_engines_evictions_once_and_only_new_ones():
    # engine 0: two tensor-parallel ranks that both sample (and so evict the same keys)
    engines = {b"\x00\x00": [{"a": [0.1]}, {"a": [0.1]}], b"\x01\x00": [{"b": [0.2]}]}
    counts = {b"\x00\x00": [3, 3], b"\x01\x00": [2]}
    llm, _ = dp_llm(engines, counts)
    fetcher = EntropyFetcher(llm)
    reported: list[int] = []
    fetcher.on_evictions = reported.append

    async def go():
        await fetcher.fetch("a", 1)
        counts[b"\x01\x00"] = [7]  # engine 1 evicted 5 more since
        await fetcher.fetch("b", 1)
        await fetcher.fetch("a", 1)  # nothing new

    asyncio.run(go())
    assert reported == [5, 5]
    assert fetcher.evictions == {0: 3, 1: 7}

"""`stepzip bench score`: scoring given tokens vs generating them vs vLLM's own prefill of
them, on one server.

    stepzip bench score --concurrency 16 --max-tokens 128 --rounds 3

Generates greedy traces for `concurrency` GSM8K problems with /v1/compress (one request
each, all in flight at once, no answers); then, every round, in a rotating order:
`generate` (the same /v1/compress requests again), `score` (/v1/score of exactly those
token ids: one prefill pass per trace on a server whose /health says `"scoring":
"prefill"`, else teacher forcing) and `vllm_prefill` (/v1/completions on the same engine
with prompt + reasoning ids, `prompt_logprobs: 0`, `max_tokens: 1`: vLLM's own
prompt-logprobs pass, which takes logits and a log-softmax at every prompt position,
without entropies, steps or variants). Rates count reasoning tokens in all three.
Prints tok/s of each, the paired ratios score / generate and score / vllm_prefill, and
one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from clients.bench import describe, model_folder, paired_ratio
from clients.launcher import ServerProcess

PATHS = ("generate", "score", "vllm_prefill")


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("score", help="/v1/score vs /v1/compress vs vLLM's prefill "
                                           "tokens/s, same tokens",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default",
                   help="model of the server started (`tiny`: the bench's tiny model)")
    p.add_argument("--url", default=None, help="a running stepzip server (else one is started)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per trace at most")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds of each")
    p.add_argument("--max-model-len", type=int, default=1024, help="of the server started")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.set_defaults(func=cmd_bench_score)


async def _generate(url: str, problems: list[str], max_tokens: int):
    """-> ([(problem, prompt, token ids)], tokens, seconds)"""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        async def one(text: str) -> tuple[str, str, list[int]]:
            r = await http.post("/v1/compress", json={
                "problems": [{"text": text}], "answer": False, "return_tokens": True,
                "sampling": {"max_tokens": max_tokens, "temperature": 0.0}})
            r.raise_for_status()
            result = r.json()["results"][0]
            return text, result["prompt"], result["traces"][0]["tokens"]["ids"]

        started = time.perf_counter()
        traces = await asyncio.gather(*(one(p) for p in problems))
        return traces, sum(len(ids) for _, _, ids in traces), time.perf_counter() - started


async def _score(url: str, traces: list[tuple[str, str, list[int]]]) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        async def one(text: str, ids: list[int]) -> int:
            r = await http.post("/v1/score", json={
                "pairs": [{"problem": text, "reasoning_ids": ids}], "answer": False})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(text, ids) for text, _, ids in traces))
        return sum(counts), time.perf_counter() - started


async def _engine_prompts(url: str, traces: list[tuple[str, str, list[int]]]) -> list[dict]:
    """Per trace: prompt + reasoning ids, as the server encodes the prompt (no specials)."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def one(prompt: str, ids: list[int]) -> dict:
            r = await http.post("/tokenize", json={"model": model, "prompt": prompt,
                                                   "add_special_tokens": False})
            r.raise_for_status()
            return {"model": model, "prompt": r.json()["tokens"] + ids, "n_scored": len(ids)}

        return await asyncio.gather(*(one(prompt, ids) for _, prompt, ids in traces))


async def _vllm_prefill(url: str, prompts: list[dict]) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        async def one(p: dict) -> int:
            r = await http.post("/v1/completions", json={
                "model": p["model"], "prompt": p["prompt"], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0})
            r.raise_for_status()
            return p["n_scored"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - started


def measure(url: str, problems: list[str], max_tokens: int, rounds: int) -> dict:
    traces, _, _ = asyncio.run(_generate(url, problems, max_tokens))  # warm-up; the tokens
    prompts = asyncio.run(_engine_prompts(url, traces))
    scoring = httpx.get(f"{url}/health", timeout=60).json().get("scoring")
    rates: dict[str, list[float]] = {name: [] for name in PATHS}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name in PATHS[r % 3:] + PATHS[:r % 3]:  # each path leads a third of the rounds
            if name == "generate":
                _, n, secs = asyncio.run(_generate(url, problems, max_tokens))
            elif name == "score":
                n, secs = asyncio.run(_score(url, traces))
            else:
                n, secs = asyncio.run(_vllm_prefill(url, prompts))
            tokens[name] = n
            rates[name].append(n / secs)
            print(f"round {r + 1} {name:12s}: {n} tokens in {secs:.2f} s = "
                  f"{n / secs:.1f} tok/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"benchmark": "score", "scoring": scoring, "concurrency": len(problems),
            "max_tokens": max_tokens, "rounds": rounds, "tokens": tokens,
            **{f"{name}_tok_s": rates[name] for name in PATHS},
            **{f"median_{name}": medians[name] for name in PATHS},
            "score_vs_generate": paired_ratio(rates["score"], rates["generate"]),
            "score_vs_vllm_prefill": paired_ratio(rates["score"], rates["vllm_prefill"])}


def cmd_bench_score(args) -> int:
    from stepzip.data import load_problems

    problems = [p.question for p in load_problems("gsm8k", "test", limit=args.concurrency)]
    server = None
    url = args.url
    if url is None:
        server = ServerProcess(["serve", "--model", model_folder(args.model),
                                "--max-model-len", str(args.max_model_len), "--max-num-seqs",
                                str(max(args.concurrency, 8))])
        print("starting server ...", flush=True)
        server.start()
        url = server.url
    try:
        summary = measure(url, problems, args.max_tokens, args.rounds)
    finally:
        if server is not None:
            server.stop()
    m = {name: summary[f"median_{name}"] for name in PATHS}
    print(f"scoring ({summary['scoring']}) {m['score']:.1f} tok/s, generating the same tokens "
          f"{m['generate']:.1f}, vLLM's prefill with prompt_logprobs {m['vllm_prefill']:.1f} "
          f"(medians; {args.concurrency} concurrent, <= {args.max_tokens} tokens each)")
    print(f"score / generate: {describe(summary['score_vs_generate'])}")
    print(f"score / vllm_prefill: {describe(summary['score_vs_vllm_prefill'])}")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0

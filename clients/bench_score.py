"""`stepzip bench score`: scoring given tokens vs generating them, on one server.

    stepzip bench score --concurrency 16 --max-tokens 128 --rounds 3

Generates greedy traces for `concurrency` GSM8K problems with /v1/compress (one request
each, all in flight at once, no answers), then scores exactly those token ids with
/v1/score the same way; later rounds repeat both, alternating which goes first. Both
paths fetch the same entropies and build the same steps and variants, so the ratio of
their tokens/s is what teacher forcing costs relative to sampling. Prints tok/s of each,
the ratio (score / generate) and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from clients.bench import describe, paired_ratio
from clients.launcher import ServerProcess


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("score", help="/v1/score vs /v1/compress tokens/s, same tokens",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help="model of the server started")
    p.add_argument("--url", default=None, help="a running stepzip server (else one is started)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per trace at most")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds of each")
    p.add_argument("--max-model-len", type=int, default=1024, help="of the server started")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.set_defaults(func=cmd_bench_score)


async def _generate(url: str, problems: list[str], max_tokens: int):
    """-> ([(problem, token ids)], tokens, seconds)"""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        async def one(text: str) -> tuple[str, list[int]]:
            r = await http.post("/v1/compress", json={
                "problems": [{"text": text}], "answer": False, "return_tokens": True,
                "sampling": {"max_tokens": max_tokens, "temperature": 0.0}})
            r.raise_for_status()
            return text, r.json()["results"][0]["traces"][0]["tokens"]["ids"]

        started = time.perf_counter()
        traces = await asyncio.gather(*(one(p) for p in problems))
        return traces, sum(len(ids) for _, ids in traces), time.perf_counter() - started


async def _score(url: str, traces: list[tuple[str, list[int]]]) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        async def one(text: str, ids: list[int]) -> int:
            r = await http.post("/v1/score", json={
                "pairs": [{"problem": text, "reasoning_ids": ids}], "answer": False})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(text, ids) for text, ids in traces))
        return sum(counts), time.perf_counter() - started


def measure(url: str, problems: list[str], max_tokens: int, rounds: int) -> dict:
    traces, _, _ = asyncio.run(_generate(url, problems, max_tokens))  # warm-up; the tokens
    rates: dict[str, list[float]] = {"generate": [], "score": []}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        order = ["generate", "score"] if r % 2 == 0 else ["score", "generate"]
        for name in order:
            if name == "generate":
                _, n, secs = asyncio.run(_generate(url, problems, max_tokens))
            else:
                n, secs = asyncio.run(_score(url, traces))
            tokens[name] = n
            rates[name].append(n / secs)
            print(f"round {r + 1} {name:8s}: {n} tokens in {secs:.2f} s = {n / secs:.1f} tok/s",
                  flush=True)
    gen, score = statistics.median(rates["generate"]), statistics.median(rates["score"])
    paired = paired_ratio(rates["score"], rates["generate"])
    return {"benchmark": "score", "concurrency": len(problems), "max_tokens": max_tokens,
            "rounds": rounds, "tokens": tokens, "generate_tok_s": rates["generate"],
            "score_tok_s": rates["score"], "median_generate": gen, "median_score": score,
            "ratio_score_generate": paired["ratio"], "paired": paired}


def cmd_bench_score(args) -> int:
    from stepzip.data import load_problems

    problems = [p.question for p in load_problems("gsm8k", "test", limit=args.concurrency)]
    server = None
    url = args.url
    if url is None:
        server = ServerProcess(["serve", "--model", args.model, "--max-model-len",
                                str(args.max_model_len), "--max-num-seqs",
                                str(max(args.concurrency, 8))])
        print("starting server ...", flush=True)
        server.start()
        url = server.url
    try:
        summary = measure(url, problems, args.max_tokens, args.rounds)
    finally:
        if server is not None:
            server.stop()
    print(f"scoring vs generating the same tokens: {summary['median_score']:.1f} vs "
          f"{summary['median_generate']:.1f} tok/s (medians) -> {describe(summary['paired'])} "
          f"({args.concurrency} concurrent, <= {args.max_tokens} tokens each)")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0

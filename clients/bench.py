"""HTTP benchmarks. Each prints its own honest metric, measured as a ratio in one run.

    stepzip bench entropy --concurrency 28 --max-tokens 128 --rounds 3
        Same server settings started twice, entropy processor on and off; rounds alternate
        between them (on, off, on, off, ...) so drift hits both; prints completion tok/s
        of each and the on/off ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from clients.launcher import ServerProcess


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="HTTP benchmarks")
    bench_sub = bench.add_subparsers(metavar="benchmark")
    ent = bench_sub.add_parser("entropy", help="throughput with entropy on vs off",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ent.add_argument("--model", default="default")
    ent.add_argument("--concurrency", type=int, default=28)
    ent.add_argument("--max-tokens", type=int, default=128)
    ent.add_argument("--rounds", type=int, default=3, help="measured rounds per setting")
    ent.add_argument("--max-model-len", type=int, default=1024)
    ent.add_argument("--json", type=Path, default=None, help="write results here")
    ent.set_defaults(func=cmd_bench_entropy)


async def _one_round(url: str, problems: list[str], max_tokens: int) -> tuple[int, float]:
    """Send all problems at once (one request each); return (completion tokens, seconds)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def one(text: str) -> int:
            r = await http.post("/v1/compress", json={
                "problems": [{"text": text}], "answer": False,
                "sampling": {"max_tokens": max_tokens, "temperature": 0.0}})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in problems))
        return sum(counts), time.perf_counter() - started


def cmd_bench_entropy(args) -> int:
    from server.data import load_problems

    problems = [p.question for p in load_problems("gsm8k", "test", limit=args.concurrency)]
    base = ["serve", "--model", args.model, "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(max(args.concurrency, 8))]
    results: dict[str, list[float]] = {"on": [], "off": []}
    tokens: dict[str, int] = {}
    servers = {"on": ServerProcess(base + ["--entropy"]),
               "off": ServerProcess(base + ["--no-entropy"])}
    try:
        for name, server in servers.items():
            print(f"starting server with entropy {name} ...", flush=True)
            server.start()
            asyncio.run(_one_round(server.url, problems, args.max_tokens))  # warm-up
        for r in range(args.rounds):
            for name, server in servers.items():
                n, secs = asyncio.run(_one_round(server.url, problems, args.max_tokens))
                tokens[name] = n
                results[name].append(n / secs)
                print(f"round {r + 1} entropy {name:3s}: {n} tokens in {secs:.2f} s = "
                      f"{n / secs:.1f} tok/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    summary = {"benchmark": "entropy", "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "rounds": args.rounds,
               "tok_s_on": results["on"], "tok_s_off": results["off"],
               "median_on": on, "median_off": off, "ratio_on_off": on / off,
               "completion_tokens": tokens}
    print(f"entropy on/off throughput ratio: {on / off:.3f} "
          f"(median {on:.1f} vs {off:.1f} tok/s, {args.concurrency} concurrent x "
          f"{args.max_tokens} tokens)")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0

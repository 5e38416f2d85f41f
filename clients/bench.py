"""HTTP benchmarks. Each prints its own honest metric, measured as a ratio in one run.

    stepzip bench rollout --k 14 --max-tokens 64 --concurrency 8 32
        TRL-style rollouts (/v1/completions, n=K, ignore_eos so every completion has
        exactly max-tokens tokens) against stepzip with per-token entropies returned and
        against vLLM's own OpenAI server on the same model, dtype and batch limits; rounds
        alternate between the servers. Prints tok/s of each, the ratio, and the time of
        one in-place weight reload of the model on stepzip.

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

    roll = bench_sub.add_parser(
        "rollout", help="K rollouts per prompt: stepzip (entropies on) vs vLLM's own server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    roll.add_argument("--model", default="default")
    roll.add_argument("--k", type=int, default=14, help="completions per prompt (n)")
    roll.add_argument("--max-tokens", type=int, default=64)
    roll.add_argument("--concurrency", type=int, nargs="+", default=[8, 32],
                      help="prompts in flight at once")
    roll.add_argument("--rounds", type=int, default=2)
    roll.add_argument("--max-num-seqs", type=int, default=256)
    roll.add_argument("--dtype", default="float32")
    roll.add_argument("--json", type=Path, default=None)
    roll.set_defaults(func=cmd_bench_rollout)


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
    from stepzip.data import load_problems

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


async def _rollout_round(url: str, model: str, prompts: list[str], k: int, max_tokens: int,
                         extra: dict) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        async def one(prompt: str) -> int:
            r = await http.post("/v1/completions", json={
                "model": model, "prompt": prompt, "n": k, "max_tokens": max_tokens,
                "temperature": 1.0, "ignore_eos": True, "logprobs": 0,
                "return_token_ids": True, "return_tokens_as_token_ids": True, **extra})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - started


def cmd_bench_rollout(args) -> int:
    import sys

    from stepzip.data import load_problems
    from stepzip.modelcache import resolve_model

    model_path = resolve_model(args.model)
    problems = [p.question for p in load_problems("gsm8k", "test", limit=max(args.concurrency))]
    common = ["--max-model-len", "1024", "--max-num-seqs", str(args.max_num_seqs),
              "--dtype", args.dtype]
    stepzip = ServerProcess(["serve", "--model", model_path, "--served-model-name", "bench",
                             "--enable-weight-routes", "--weights-root", model_path, *common])
    vllm = ServerProcess(command=[
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
        "--served-model-name", "bench", "--enforce-eager", "--host", "127.0.0.1",
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
        *common], env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    vllm.command += ["--port", str(vllm.port)]
    servers = {"stepzip": (stepzip, {"stepzip": {"entropies": True}}), "vllm": (vllm, {})}
    results: dict[str, dict[int, list[float]]] = {n: {c: [] for c in args.concurrency}
                                                   for n in servers}
    reload_s = None
    try:
        for name, (server, extra) in servers.items():
            print(f"starting {name} ...", flush=True)
            server.start()
            print(f"{name} ready in {server.startup_s:.0f} s", flush=True)
            asyncio.run(_rollout_round(server.url, "bench", problems[:2], args.k, 8, extra))
        for c in args.concurrency:
            for r in range(args.rounds):
                for name, (server, extra) in servers.items():
                    n, secs = asyncio.run(_rollout_round(
                        server.url, "bench", problems[:c], args.k, args.max_tokens, extra))
                    results[name][c].append(n / secs)
                    print(f"concurrency {c:3d} round {r + 1} {name:8s}: {n} tokens in "
                          f"{secs:.1f} s = {n / secs:.1f} tok/s", flush=True)
        times = []
        for _ in range(3):
            reply = httpx.post(stepzip.url + "/v1/weights/load",
                               json={"path": model_path, "checksum": False}, timeout=600)
            reply.raise_for_status()
            times.append(reply.json()["seconds"])
        reload_s = statistics.median(times)
    finally:
        stepzip.stop()
        vllm.stop()
    summary = {"benchmark": "rollout", "k": args.k, "max_tokens": args.max_tokens,
               "dtype": args.dtype, "reload_s": reload_s, "by_concurrency": {}}
    for c in args.concurrency:
        ours = statistics.median(results["stepzip"][c])
        theirs = statistics.median(results["vllm"][c])
        summary["by_concurrency"][c] = {"stepzip_tok_s": results["stepzip"][c],
                                        "vllm_tok_s": results["vllm"][c],
                                        "ratio": ours / theirs}
        print(f"concurrency {c}: stepzip (entropies on) {ours:.1f} tok/s vs vLLM serve "
              f"{theirs:.1f} tok/s -> ratio {ours / theirs:.3f}")
    print(f"weight reload of the model on stepzip: {reload_s:.2f} s (median of 3)")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0

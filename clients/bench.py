"""Benchmarks. Each prints its own honest metric, measured as a ratio in one run.

    stepzip bench rollout --k 14 --max-tokens 64 --concurrency 8 32
        TRL-style rollouts (/v1/completions, n=K, the sampling fields and `logprobs` that
        trl's VLLMClient.generate sends, plus ignore_eos so every completion has exactly
        max-tokens tokens) against stepzip returning per-token entropies and against
        vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on the
        same model, dtype and batch limits, and against the same stepzip server asked
        without the `stepzip` object ("plain": what the entropies cost). Rounds rotate
        over the three arms (and which goes first). By default on two models: `default` (the embedded
        SmolLM2-135M: the model's arithmetic dominates, "model-bound") and `tiny` (a
        2-layer random Llama with hidden size 128 and the SmolLM2 tokenizer and
        vocabulary, built once from the default model's folder: the server's own
        per-token cost shows, "overhead-bound"). `--url STEPZIP VLLM` measures two
        servers already running instead. Prints tok/s, the ratio per concurrency (the
        median of each round's ratio, `paired_ratio`) against vLLM and against plain,
        and the time of an in-place weight reload on stepzip. vLLM runs with stepzip's --logprobs-mode (TRL's).

    stepzip bench entropy --concurrency 28 --max-tokens 128 --rounds 6
        The same stepzip server settings started twice, entropy processor on (requests
        ask for entropies) and off; greedy /v1/completions, rounds alternate; prints
        completion tok/s of each and the on/off ratio.

    stepzip bench noise --repeats 30
        The same work (forty 512x512 float32 matmuls on one thread) timed again and again
        with pauses: the spread is the floor under every ratio above on this machine.

    stepzip bench kernel --rows 112 --vocab 49152 --threads 1
        The entropy kernel `entropy_from_logits` picks on this machine vs
        `torch.log_softmax` (and the torch reference path) on the same float32 logits and
        thread count, alternating calls; prints median ms, the ratio and the error
        against float64. No server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from clients.launcher import ServerProcess

TINY = "tiny"  # --model name of the overhead-bound model the bench builds itself
TINY_FOLDER = "tiny-random-llama-2x128"
# What trl 1.16's VLLMClient.generate sends besides n / max_tokens / logprobs.
TRL_SAMPLING = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "min_p": 0.0, "return_token_ids": True, "return_tokens_as_token_ids": True}


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (HTTP servers, entropy kernel)")
    bench_sub = bench.add_subparsers(metavar="benchmark")
    ent = bench_sub.add_parser("entropy", help="throughput with entropy on vs off",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ent.add_argument("--model", default="default", help="model to serve")
    ent.add_argument("--concurrency", type=int, default=28, help="requests in flight at once")
    ent.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    ent.add_argument("--rounds", type=int, default=6, help="measured rounds per setting")
    ent.add_argument("--max-model-len", type=int, default=1024, help="server --max-model-len")
    ent.add_argument("--json", type=Path, default=None, help="write results here")
    ent.set_defaults(func=cmd_bench_entropy)

    roll = bench_sub.add_parser(
        "rollout", help="K rollouts per prompt: stepzip (entropies on) vs vLLM's own server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    roll.add_argument("--model", nargs="+", default=["default", TINY],
                      help="models to run on, one after the other: `default` (model-bound), "
                           f"`{TINY}` (overhead-bound, built once into the model cache), or "
                           "any model folder")
    roll.add_argument("--url", nargs=2, metavar=("STEPZIP_URL", "VLLM_URL"), default=None,
                      help="measure these two running servers (same model) instead of "
                           "starting them; --model is then ignored")
    roll.add_argument("--k", type=int, default=14, help="completions per prompt (n)")
    roll.add_argument("--max-tokens", type=int, default=64, help="tokens per completion")
    roll.add_argument("--concurrency", type=int, nargs="+", default=[8, 32],
                      help="prompts in flight at once")
    roll.add_argument("--rounds", type=int, default=4, help="measured rounds per server")
    roll.add_argument("--logprobs", type=int, default=0,
                      help="logprobs per token, as TRL sends it (0: the sampled token's); "
                           "-1 leaves the field out")
    roll.add_argument("--arms", nargs="+", choices=list(ROLLOUT_ARMS),
                      default=list(ROLLOUT_ARMS),
                      help="what to compare: stepzip (entropies on), plain (the same server "
                           "without the stepzip object), vllm (`vllm serve`); without vllm "
                           "only one server runs, which makes the entropies' cost quieter "
                           "to measure on a small machine")
    roll.add_argument("--max-num-seqs", type=int, default=256, help="server --max-num-seqs")
    roll.add_argument("--dtype", default="float32", help="server --dtype")
    roll.add_argument("--json", type=Path, default=None, help="write results here")
    roll.set_defaults(func=cmd_bench_rollout)

    kern = bench_sub.add_parser(
        "kernel", help="entropy kernel vs torch.log_softmax on the same logits",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    kern.add_argument("--rows", type=int, default=112, help="logits rows (sequences per step)")
    kern.add_argument("--vocab", type=int, default=49_152, help="vocabulary size")
    kern.add_argument("--threads", type=int, default=1,
                      help="torch threads; vLLM's CPU worker uses one per core it is bound "
                           "to (VLLM_CPU_OMP_THREADS_BIND): 1 on this project's machines")
    kern.add_argument("--rounds", type=int, default=50, help="alternating rounds")
    kern.add_argument("--json", type=Path, default=None, help="write results here")
    kern.set_defaults(func=cmd_bench_kernel)

    noise = bench_sub.add_parser(
        "noise", help="how steady this machine is: a fixed single-thread loop, timed",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    noise.add_argument("--repeats", type=int, default=30, help="timed repetitions")
    noise.add_argument("--pause", type=float, default=0.5, help="seconds between them")
    noise.add_argument("--json", type=Path, default=None, help="write results here")
    noise.set_defaults(func=cmd_bench_noise)

    from clients import bench_score  # /v1/score vs /v1/compress (its own module)

    bench_score.add_parser(bench_sub)


def _write_summary(summary: dict, path: Path | None) -> None:
    print(json.dumps(summary))
    if path:
        path.write_text(json.dumps(summary, indent=2))


# ---- entropy on / off ------------------------------------------------------------------

async def _greedy_round(url: str, prompts: list[str], max_tokens: int,
                        extra: dict) -> tuple[int, float]:
    """Send all prompts at once (one request each); return (completion tokens, seconds)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def one(prompt: str) -> int:
            r = await http.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, **extra})  # equal work per round
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - started


def cmd_bench_entropy(args) -> int:
    from stepzip.data import load_problems

    problems = [p.question for p in load_problems("gsm8k", "test", limit=args.concurrency)]
    base = ["serve", "--model", args.model, "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(max(args.concurrency, 8))]
    results: dict[str, list[float]] = {"on": [], "off": []}
    tokens: dict[str, int] = {}
    servers = {"on": (ServerProcess(base + ["--entropy"]), {"stepzip": {"entropies": True}}),
               "off": (ServerProcess(base + ["--no-entropy"]), {})}
    try:
        for name, (server, extra) in servers.items():
            print(f"starting server with entropy {name} ...", flush=True)
            server.start()
            asyncio.run(_greedy_round(server.url, problems, args.max_tokens, extra))  # warm-up
        for r in range(args.rounds):
            for name in _alternate(list(servers), r):
                server, extra = servers[name]
                n, secs = asyncio.run(_greedy_round(server.url, problems, args.max_tokens, extra))
                tokens[name] = n
                results[name].append(n / secs)
                print(f"round {r + 1} entropy {name:3s}: {n} tokens in {secs:.2f} s = "
                      f"{n / secs:.1f} tok/s", flush=True)
    finally:
        for server, _ in servers.values():
            server.stop()
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    paired = paired_ratio(results["on"], results["off"])
    print(f"entropy on/off throughput: {describe(paired)}; median {on:.1f} vs {off:.1f} "
          f"tok/s, {args.concurrency} concurrent x {args.max_tokens} tokens")
    _write_summary({"benchmark": "entropy", "concurrency": args.concurrency,
                    "max_tokens": args.max_tokens, "rounds": args.rounds,
                    "tok_s_on": results["on"], "tok_s_off": results["off"],
                    "median_on": on, "median_off": off, "ratio_on_off": paired["ratio"],
                    "paired": paired,
                    "completion_tokens": tokens}, args.json)
    return 0


def _alternate(names: list[str], round_index: int) -> list[str]:
    """Who goes first flips every round, so neither server always runs on a warmer CPU."""
    return names if round_index % 2 == 0 else names[::-1]


def paired_ratio(ours: list[float], theirs: list[float]) -> dict:
    """`ratio`: the median over rounds of ours / theirs within a round. A round's two runs
    are adjacent in time, so a slow phase of a shared machine (this project's box swings
    +-30 % over seconds on a fixed single-thread loop) hits both; the median then drops
    the rounds a phase change split. Also the spread and the ratio of medians."""
    per_round = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"ratio": statistics.median(per_round),
            "ratio_min": min(per_round), "ratio_max": max(per_round),
            "per_round": per_round,
            "ratio_of_medians": statistics.median(ours) / statistics.median(theirs)}


def describe(paired: dict) -> str:
    return (f"ratio {paired['ratio']:.3f} (median of {len(paired['per_round'])} rounds' "
            f"ratios, range {paired['ratio_min']:.3f}-{paired['ratio_max']:.3f}; ratio of "
            f"medians {paired['ratio_of_medians']:.3f})")


# ---- rollouts --------------------------------------------------------------------------

def build_tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama (hidden 128, head_dim 64: the smallest the CPU attention
    runs) with the default model's tokenizer and 49,152-entry vocabulary, saved once."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import shutil

    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stepzip.modelcache import resolve_model

    source = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(source)
    base = AutoConfig.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=base.vocab_size, hidden_size=128, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=base.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
        pad_token_id=getattr(base, "pad_token_id", None), torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)  # whole folder or nothing: a killed build is redone
    return folder


def model_folder(name: str) -> str:
    from stepzip.modelcache import default_cache_dir, resolve_model

    if name == TINY:
        return str(build_tiny_model(default_cache_dir() / TINY_FOLDER))
    return resolve_model(name)


async def _rollout_round(url: str, prompts: list[str], k: int, max_tokens: int,
                         logprobs: int, extra: dict) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "n": k, "max_tokens": max_tokens, "ignore_eos": True,
                **TRL_SAMPLING, **extra}
        if logprobs >= 0:
            body["logprobs"] = logprobs

        async def one(prompt: str) -> int:
            r = await http.post("/v1/completions", json={"prompt": prompt, **body})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - started


def _rollout_servers(model_path: str, args) -> dict[str, ServerProcess]:
    """The servers the asked-for arms need (stepzip always: it serves two of them)."""
    common = ["--max-model-len", "1024", "--max-num-seqs", str(args.max_num_seqs),
              "--dtype", args.dtype]
    stepzip = ServerProcess(["serve", "--model", model_path, "--served-model-name", "bench",
                             "--enable-weight-routes", "--weights-root", model_path, *common])
    vllm = ServerProcess(command=[
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
        "--served-model-name", "bench", "--enforce-eager", "--host", "127.0.0.1",
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
        # What stepzip defaults to, as TRL's `vllm-serve` starts vLLM.
        "--logprobs-mode", "processed_logprobs", *common],
        env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    vllm.command += ["--port", str(vllm.port)]
    return {"stepzip": stepzip, **({"vllm": vllm} if "vllm" in args.arms else {})}


# The arms of `bench rollout`: (server, extra request fields). "plain" is the same
# stepzip server asked without the `stepzip` object (no entropies fetched or returned).
ROLLOUT_ARMS = {"stepzip": ("stepzip", {"stepzip": {"entropies": True}}),
                "plain": ("stepzip", {}),
                "vllm": ("vllm", {})}


def _rotate(names: list[str], round_index: int) -> list[str]:
    """Who goes first changes every round (every arm leads once per len(names) rounds), so
    no arm always runs on a warmer or colder CPU."""
    shift = round_index % len(names)
    order = names[shift:] + names[:shift]
    return order if (round_index // len(names)) % 2 == 0 else order[::-1]


def _measure_rollouts(urls: dict[str, str], problems: list[str], args) -> dict:
    """Rounds rotating over the arms per concurrency; returns {concurrency: {arm: [tok/s,
    ...]}}."""
    arms = {arm: (urls[server], extra) for arm, (server, extra) in ROLLOUT_ARMS.items()
            if arm in args.arms}
    for url, extra in arms.values():  # warm-up: first requests pay for lazy set-up
        asyncio.run(_rollout_round(url, problems[:2], args.k, 8, args.logprobs, extra))
    results: dict[int, dict[str, list[float]]] = {}
    for c in args.concurrency:
        results[c] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for arm in _rotate(list(arms), r):
                url, extra = arms[arm]
                n, secs = asyncio.run(_rollout_round(
                    url, problems[:c], args.k, args.max_tokens, args.logprobs, extra))
                results[c][arm].append(n / secs)
                print(f"concurrency {c:3d} round {r + 1} {arm:8s}: {n} tokens in "
                      f"{secs:.1f} s = {n / secs:.1f} tok/s", flush=True)
    return results


def _reload_seconds(url: str, path: str) -> float:
    times = []
    for _ in range(3):
        reply = httpx.post(url + "/v1/weights/load", json={"path": path, "checksum": False},
                           timeout=600)
        reply.raise_for_status()
        times.append(reply.json()["seconds"])
    return statistics.median(times)


def _rollout_model(label: str, model_path: str | None, problems: list[str], args) -> dict:
    """Measure one model (servers started here unless --url) and print its ratios."""
    reload_s = None
    if args.url:
        if "vllm" not in args.arms:
            raise SystemExit("--url names a stepzip and a vLLM server; leave --arms at its "
                             "default with it")
        results = _measure_rollouts(dict(zip(("stepzip", "vllm"), args.url, strict=True)),
                                    problems, args)
    else:
        servers = _rollout_servers(model_path, args)
        try:
            for name, server in servers.items():
                print(f"[{label}] starting {name} on {model_path} ...", flush=True)
                server.start()
                print(f"[{label}] {name} ready in {server.startup_s:.0f} s", flush=True)
            results = _measure_rollouts({n: s.url for n, s in servers.items()}, problems, args)
            reload_s = _reload_seconds(servers["stepzip"].url, model_path)
        finally:
            for server in servers.values():
                server.stop()
    kind = {"default": "model-bound", TINY: "overhead-bound"}.get(label, label)
    out = {"model": label, "path": model_path, "kind": kind, "reload_s": reload_s,
           "by_concurrency": {}}
    for c, per in results.items():
        row = out["by_concurrency"][c] = {f"{arm}_tok_s": values for arm, values in per.items()}
        if "stepzip" in per and "vllm" in per:
            row.update(paired := paired_ratio(per["stepzip"], per["vllm"]))
            print(f"[{label}, {kind}] concurrency {c}: stepzip (entropies on) "
                  f"{statistics.median(per['stepzip']):.1f} tok/s vs vLLM serve "
                  f"{statistics.median(per['vllm']):.1f} tok/s (medians) -> {describe(paired)}",
                  flush=True)
        if "stepzip" in per and "plain" in per:
            row["vs_plain"] = vs_plain = paired_ratio(per["stepzip"], per["plain"])
            print(f"[{label}, {kind}] concurrency {c}: entropies on "
                  f"{statistics.median(per['stepzip']):.1f} tok/s vs the same server without "
                  f"the stepzip object {statistics.median(per['plain']):.1f} tok/s (medians) -> "
                  f"{describe(vs_plain)}", flush=True)
    if reload_s is not None:
        print(f"[{label}] weight reload on stepzip: {reload_s:.2f} s (median of 3)")
    return out


def cmd_bench_rollout(args) -> int:
    from stepzip.data import load_problems

    problems = [p.question for p in load_problems("gsm8k", "test", limit=max(args.concurrency))]
    if args.url:
        models = [_rollout_model("servers", None, problems, args)]
    else:
        models = [_rollout_model(name, model_folder(name), problems, args)
                  for name in args.model]
    _write_summary({"benchmark": "rollout", "k": args.k, "max_tokens": args.max_tokens,
                    "dtype": args.dtype, "logprobs": args.logprobs, "rounds": args.rounds,
                    "arms": args.arms, "models": models}, args.json)
    return 0


# ---- entropy kernel --------------------------------------------------------------------

def cmd_bench_kernel(args) -> int:
    import torch

    from server.engine import entropy_cpu
    from server.engine.entropy import entropy_from_logits, entropy_torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-1.3, 1.48, args.rows)[:, None]  # 0.05 .. 30: sharp and flat rows
    logits = torch.randn(args.rows, args.vocab, generator=gen) * scale  # [rows, vocab] f32
    reused = torch.empty_like(logits)  # log_softmax's arithmetic alone, no fresh output
    calls = {"log_softmax": lambda: torch.log_softmax(logits, dim=-1),
             "log_softmax_into_buffer": lambda: torch._log_softmax(logits, -1, False, out=reused),
             "kernel": lambda: entropy_from_logits(logits),
             "entropy_torch": lambda: entropy_torch(logits)}
    for fn in calls.values():  # compile / first-touch outside the timing
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.rounds):
        order = list(calls)[r % len(calls):] + list(calls)[:r % len(calls)]
        for name in order:
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    x = logits.double()
    reference = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)  # [rows] f64
    error = (entropy_from_logits(logits).double() - reference).abs().max().item()
    kernel = "numba" if entropy_cpu.AVAILABLE else "torch"
    ratio = ms["kernel"] / ms["log_softmax"]
    ratio_buffer = ms["kernel"] / ms["log_softmax_into_buffer"]
    print(f"[{args.rows}, {args.vocab}] float32, {args.threads} thread(s), {args.rounds} "
          f"alternating rounds: log_softmax {ms['log_softmax']:.2f} ms (into a reused buffer "
          f"{ms['log_softmax_into_buffer']:.2f} ms), {kernel} kernel {ms['kernel']:.2f} ms, "
          f"entropy_torch {ms['entropy_torch']:.2f} ms -> kernel / log_softmax {ratio:.2f} "
          f"({ratio_buffer:.2f} vs the reused buffer); max error vs float64 {error:.1e} nats")
    _write_summary({"benchmark": "kernel", "rows": args.rows, "vocab": args.vocab,
                    "threads": args.threads, "rounds": args.rounds, "kernel": kernel,
                    "median_ms": ms, "ratio_kernel_log_softmax": ratio,
                    "ratio_kernel_log_softmax_into_buffer": ratio_buffer,
                    "max_abs_err_f64": error}, args.json)
    return 0


# ---- machine noise ---------------------------------------------------------------------

def cmd_bench_noise(args) -> int:
    import torch

    torch.set_num_threads(1)
    a = torch.rand(512, 512, generator=torch.Generator().manual_seed(0))  # [512, 512] f32
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for _ in range(40):
            a @ a
        times.append((time.perf_counter() - started) * 1e3)
        time.sleep(args.pause)
    lo, mid, hi = min(times), statistics.median(times), max(times)
    print(f"fixed single-thread loop, {args.repeats} repeats: min {lo:.1f} ms, median "
          f"{mid:.1f} ms, max {hi:.1f} ms (max / min {hi / lo:.2f})")
    _write_summary({"benchmark": "noise", "ms": times, "min_ms": lo, "median_ms": mid,
                    "max_ms": hi}, args.json)
    return 0

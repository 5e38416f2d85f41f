"""The main job: serve the default model and compress sample GSM8K problems."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console

from clients.client import StepzipClient
from clients.launcher import ServerProcess
from clients.report import print_compress_table, progress_bar
from stepzip.data import load_problems


def run_demo(*, model: str = "default", n_problems: int = 3, max_tokens: int = 192,
             port: int = 0, url: str | None = None, json_path: Path | None = None) -> int:
    console = Console()
    problems = load_problems("gsm8k", "test", limit=n_problems)
    with contextlib.ExitStack() as stack:
        if url is None:
            with console.status(f"starting stepzip on {model!r} (CPU start-up takes "
                                f"~30-120 s)..."):
                server = stack.enter_context(ServerProcess(
                    ["serve", "--model", model, "--max-model-len", "2048"], port=port or None))
            url = server.url
            console.print(f"server ready at {url} in {server.startup_s:.0f} s "
                          f"(log: {server.log_path})")
        client = stack.enter_context(StepzipClient(url, max_problems=1))
        with progress_bar("compressing GSM8K problems", len(problems), console) as bar:
            started = time.perf_counter()
            out = client.compress(
                [p.question for p in problems], answers=[p.answer for p in problems],
                ids=[p.id for p in problems],
                variants=[{"strategy": "low", "ratio": 0.5}, {"strategy": "low", "ratio": 0.8},
                          {"strategy": "high", "ratio": 0.8}],
                max_tokens=max_tokens, temperature=0.0, progress=bar,
                concurrency=len(problems))  # one request each, all in flight: a live bar
            wall_s = time.perf_counter() - started
        print_compress_table(out, console, wall_s=wall_s)
        first = out.results[0].traces[0]
        if first.variants:
            console.rule(f"{out.results[0].id}: low-entropy 0.5 compressed reasoning")
            console.print(first.variants[0].compressed_text, markup=False)
        if json_path:
            json_path.write_text(out.model_dump_json(indent=2))
            console.print(f"full response written to {json_path}")
    return 0

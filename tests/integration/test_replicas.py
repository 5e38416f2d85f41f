"""Scale-out with real engines on the CPU: one data-parallel server (two vLLM engine
cores, `--data-parallel-size 2`) next to the shared single-engine server.

1. A K = 14 rollout batch sent to the data-parallel server: both engines run some of
   it, every request returns its entropies (vLLM 0.32's `collective_rpc` alone would
   lose those of engine 1) and they match the single-engine server's, greedy.
2. A weight load that fails half-way in engine 1's worker only (an injected fault, see
   server/engine/weightcheck.py) is reported as failed, and both engines go on serving
   the old weights under the old version (engine 0 had loaded the new ones).
3. The two servers as replicas behind one client: `build-sft` uses both; the
   data-parallel one is killed mid-run; every problem ends up exactly once and the run
   finishes on the survivor.

One extra server (small: --max-model-len 512, 1 GiB KV cache, 16 sequences per engine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.client import StepzipClient
from clients.launcher import ServerProcess
from server.engine.weightcheck import FAULT_ENV

pytestmark = pytest.mark.engine

K = 14
TOLERANCE = 1e-3  # nats, as the entropy oracle (conftest.TOLERANCE)


@pytest.fixture(scope="module")
def dp_weights_root(tmp_path_factory):
    return tmp_path_factory.mktemp("dp-weights")


@pytest.fixture(scope="module")
def dp_server(default_model_dir, dp_weights_root, tmp_path_factory):
    # vLLM's CPU workers take one core list per data-parallel rank ("a|b"); both ranks
    # share the core this test run was given.
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0")
    if "|" not in bind:
        bind = f"{bind}|{bind}"
    argv = ["serve", "--model", str(default_model_dir), "--served-model-name", "smollm2",
            "--dtype", "float32", "--max-model-len", "512", "--kv-cache-gib", "1",
            "--max-num-seqs", "16", "--max-problems", "8", "--step-delimiter", "\\n",
            "--data-parallel-size", "2",
            "--enable-weight-routes", "--weights-root", str(dp_weights_root)]
    log = tmp_path_factory.mktemp("dp") / "server.log"
    # Every weight load fails half-way in engine 1's worker (test 2).
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind, FAULT_ENV: "1"}
    with ServerProcess(argv, env=env, log_path=log, timeout=600) as proc:
        yield proc


def engine_cpu_seconds(server: ServerProcess) -> dict[int, float]:
    """CPU seconds used so far by each data-parallel engine core (vLLM titles them
    `VLLM::EngineCore_DP<i>`) with its worker processes, if any."""
    def used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    seconds = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            match = re.search(r"EngineCore_DP(\d+)", " ".join(p.cmdline()))
            if match:
                seconds[int(match[1])] = used(p) + sum(
                    used(c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return seconds


class EngineWork:
    """`with EngineWork(server) as work:` ... `work.seconds`: CPU seconds each engine used
    in the block; `work.check_both_ran()`: each used at least a third of the busier one's
    (an idle engine core waits on its input queue and uses almost none)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.seconds = server, {}

    def __enter__(self):
        self.start = engine_cpu_seconds(self.server)
        assert sorted(self.start) == [0, 1], f"engine cores not found: {self.start}"
        return self

    def __exit__(self, *exc) -> None:
        end = engine_cpu_seconds(self.server)
        self.seconds = {i: end[i] - self.start[i] for i in self.start}

    def check_both_ran(self) -> None:
        busiest = max(self.seconds.values())
        assert busiest > 0 and min(self.seconds.values()) >= busiest / 3, (
            f"one engine did (almost) nothing: CPU seconds per engine {self.seconds}")


def rollout(client: StepzipClient, prompts: list[str]) -> list[dict]:
    """One greedy request per sample, all in flight at once, as a trainer's batch."""
    def one(prompt: str) -> dict:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                "return_token_ids": True, "stepzip": {"entropies": True}}
        return client.completions(body)["choices"][0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_k14_batch_on_two_data_parallel_engines_returns_every_entropy(dp_server, server):
    prompts = ["Tom has 3 apples and buys 4 more. How many apples?",
               "A train travels 60 miles in 1.5 hours. What is its speed?"] * (K // 2)
    with StepzipClient(dp_server.url) as dp, StepzipClient(server.url) as single:
        with EngineWork(dp_server) as work:
            spread = rollout(dp, prompts)
        reference = rollout(single, prompts[:2])
    work.check_both_ran()
    worst = 0.0
    for i, choice in enumerate(spread):
        expected = reference[i % 2]
        entropies = choice["stepzip"]["entropies"]
        assert entropies is not None and len(entropies) == len(choice["token_ids"]), i
        assert choice["token_ids"] == expected["token_ids"], f"request {i}: other tokens"
        diffs = [abs(a - b) for a, b in zip(entropies, expected["stepzip"]["entropies"])]
        worst = max(worst, *diffs)
    assert worst <= TOLERANCE
    print(f"\n{K} requests over 2 data-parallel engines: worst |diff| vs one engine "
          f"{worst:.2e} nats; engine CPU seconds {work.seconds}")


def test_a_load_failing_in_one_engine_fails_and_both_keep_the_old_weights(
        dp_server, dp_weights_root, default_model_dir):
    """Engine 0 loads the new (changed) weights, engine 1's worker fails half-way: the
    load is a 422 naming `path`, and afterwards both engines serve exactly what they did
    before (tokens, entropies within the oracle's tolerance) under the same version. It
    used to answer 200: vLLM's `collective_rpc` returns engine 0's result only."""
    tensors = load_file(str(default_model_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("mlp.down_proj.weight")]:
        tensors[name] = torch.zeros_like(tensors[name])  # changes the greedy tokens
    changed = dp_weights_root / "zeroed-mlp"
    changed.mkdir(exist_ok=True)
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    prompts = ["Tom has 3 apples and buys 4 more. How many apples?"] * K

    def version() -> str:
        return httpx.get(dp_server.url + "/health", timeout=30).json()["weight_version"]

    with StepzipClient(dp_server.url) as dp:
        version_before = version()
        with EngineWork(dp_server) as before_work:
            before = rollout(dp, prompts)
        r = httpx.post(dp_server.url + "/v1/weights/load",
                       json={"path": str(changed), "checksum": True}, timeout=600)
        assert r.status_code == 422, r.text
        detail = r.json()["details"][0]
        assert detail["field"] == "path" and "injected fault" in detail["reason"], detail
        assert "1 of 2 workers failed" in detail["reason"], detail
        with EngineWork(dp_server) as after_work:
            after = rollout(dp, prompts)
    before_work.check_both_ran()
    after_work.check_both_ran()
    assert version() == version_before
    worst = 0.0
    for i, (old, new) in enumerate(zip(before, after)):
        assert new["token_ids"] == old["token_ids"], f"request {i}: other tokens"
        diffs = [abs(a - b) for a, b in zip(new["stepzip"]["entropies"],
                                            old["stepzip"]["entropies"])]
        worst = max(worst, *diffs)
    assert worst <= TOLERANCE
    print(f"\nload failed in engine 1 only: 422 ({detail['reason'][:100]}...); "
          f"{K} requests after it on both engines (CPU s {after_work.seconds}) match, "
          f"worst entropy |diff| {worst:.2e}; version {version_before}")


def test_killing_a_replica_mid_build_loses_no_problem(dp_server, server, tmp_path):
    from trainer.build_sft import build_sft
    from trainer.config import BuildSftConfig

    n_problems = 24
    cfg = BuildSftConfig(url=f"{server.url},{dp_server.url}", output=str(tmp_path / "p.jsonl"),
                         dataset="gsm8k", split="test", limit=n_problems, batch_size=2,
                         concurrency=4, max_tokens=24, answer_max_tokens=8, keep="all",
                         retries=0, progress=False)
    client = StepzipClient(cfg.url, timeout=600, retry_after=600)
    survivor, dp = client.replicas
    killed, dp_answered = threading.Event(), threading.Event()

    # The interleaving is forced, not left to the two servers' speeds: the survivor's
    # compress requests wait until the replica to be killed has answered one, so that
    # replica is picked again (fewest outstanding) while work remains.
    def hold_until_dp_answered(send):
        def request(method, url, *args, **kwargs):
            if url == "/v1/compress":
                dp_answered.wait(timeout=300)
            return send(method, url, *args, **kwargs)
        return request

    def note_answers(send):
        def request(method, url, *args, **kwargs):
            response = send(method, url, *args, **kwargs)
            if url == "/v1/compress" and response.status_code == 200:
                dp_answered.set()
            return response
        return request

    survivor.http.request = hold_until_dp_answered(survivor.http.request)
    dp.http.request = note_answers(dp.http.request)

    def kill_when_busy():  # mid-run: the replica has answered and holds more work
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if dp.completed >= 1 and dp.outstanding >= 1:
                os.killpg(dp_server.proc.pid, signal.SIGKILL)  # a crash: no goodbyes
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    with client:
        stats = build_sft(cfg, client=client, log=lambda _m: None)
    killer.join(timeout=1)
    assert killed.is_set(), f"the replica was never busy: nothing tested\n{dp_server.tail()}"
    dp_server.proc.wait(timeout=60)
    assert dp.failures >= 1 and dp.completed >= 1 and survivor.completed >= 1

    ids = [json.loads(line)["problem_id"] for name in ("p.jsonl", "p.dropped.jsonl")
           if (tmp_path / name).exists() for line in (tmp_path / name).read_text().splitlines()]
    assert sorted(ids) == sorted(f"gsm8k-test-{i}" for i in range(n_problems))  # once each
    assert stats.failed_batches == 0 and stats.processed == n_problems
    print(f"\nbuild-sft over 2 replicas, one killed mid-run: {n_problems} problems once each; "
          f"answered {survivor.completed} / {dp.completed} requests, "
          f"{dp.failures} failed over")

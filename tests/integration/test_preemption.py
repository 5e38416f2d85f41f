"""Entropies stay exact when the engine preempts and recomputes requests.

A second server gets a KV cache of 32 blocks x 32 tokens = 1,024 tokens; 8 concurrent
greedy requests of ~100 prompt + 160 completion tokens need ~2,100, so the scheduler
must preempt running requests and recompute them later. The per-token entropies must
still equal the transformers teacher-forced reference, one per returned token.
"""

from __future__ import annotations

import pytest

from clients.client import StepzipClient
from clients.launcher import ServerProcess
from stepzip.data import load_problems

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def small_kv_client(default_model_dir):
    argv = ["serve", "--model", str(default_model_dir), "--dtype", "float32",
            "--max-model-len", "512", "--max-num-seqs", "16", "--step-delimiter", "\\n",
            "--engine-arg", "num_gpu_blocks_override=32", "--engine-arg", "block_size=32"]
    with ServerProcess(argv, timeout=600) as proc, StepzipClient(proc.url) as client:
        yield client, proc


def test_entropies_exact_under_preemption(small_kv_client, reference_model, check_traces):
    client, _proc = small_kv_client
    problems = load_problems("gsm8k", "test", limit=8)
    out = client.compress([p.question for p in problems], max_tokens=160, temperature=0.0,
                          answer=False, return_tokens=True)
    worst, checked = check_traces(out, reference_model)
    assert checked >= 8 * 40
    print(f"under preemption: {checked} tokens, worst |diff| {worst:.2e} nats")

"""One real stepzip server (vLLM engine on the CPU) shared by every integration test.

float32 is forced so the entropy oracle does not depend on whether this CPU has native
bf16 (it decides `--dtype auto`).
"""

from __future__ import annotations

import os

import pytest
import torch

from clients.client import StepzipClient
from clients.launcher import ServerProcess

MAX_MODEL_LEN = 1024
GRADING_TIMEOUT = 2.0  # the shared server's per-answer grading deadline (s)


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory):
    """Checkpoints the shared server may load (besides the default model's own folder)."""
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def server(default_model_dir, weights_root):
    roots = os.pathsep.join([str(weights_root), str(default_model_dir)])
    argv = ["serve", "--model", str(default_model_dir), "--served-model-name", "smollm2",
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "64", "--max-problems", "8", "--step-delimiter", "\\n",
            "--enable-weight-routes", "--weights-root", roots,
            "--grading-timeout", str(GRADING_TIMEOUT)]
    with ServerProcess(argv, timeout=600) as proc:
        yield proc


@pytest.fixture(scope="session")
def vllm_server(default_model_dir):
    """vLLM's own OpenAI server on the same model folder and flags as `server`, with the
    logprobs mode TRL 1.16's `vllm_serve` uses (stepzip's default): the reference for
    test_openai.py and test_parity.py."""
    import sys

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(default_model_dir), "--served-model-name", "smollm2",
               "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
               "--logprobs-mode", "processed_logprobs", "--host", "127.0.0.1"]
    proc = ServerProcess(command=command, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=600)
    proc.command += ["--port", str(proc.port)]
    with proc:
        yield proc


@pytest.fixture(scope="session")
def client(server):
    with StepzipClient(server.url, timeout=600) as c:
        yield c


# ---- the entropy oracle: transformers, teacher forcing, full softmax -----------------

TOLERANCE = 1e-3  # nats per token; see test_entropy_oracle.py for why


@pytest.fixture(scope="session")
def reference_model(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def reference_entropies(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # [seq, vocab] float64 for the reference
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion_ids)]
    logp = torch.log_softmax(rows, dim=-1)
    return (-(logp.exp() * logp).sum(-1)).tolist()


def oracle_check(response, reference_model):
    model, tokenizer = reference_model
    worst, checked = 0.0, 0
    for problem in response.results:
        prompt_ids = tokenizer.encode(problem.prompt, add_special_tokens=False)
        for trace in problem.traces:
            ids, ents = trace.tokens.ids, trace.tokens.entropies
            assert len(ents) == len(ids) == trace.completion_tokens, "one entropy per token"
            expected = reference_entropies(model, prompt_ids, ids)
            diffs = [abs(a - b) for a, b in zip(ents, expected)]
            worst = max(worst, max(diffs, default=0.0))
            checked += len(ids)
            assert all(d <= TOLERANCE for d in diffs), (
                f"max |diff| {max(diffs):.2e} at token {diffs.index(max(diffs))}")
    return worst, checked



@pytest.fixture(scope="session")
def check_traces():
    """check_traces(response, reference_model) -> (worst |diff|, tokens checked)."""
    return oracle_check

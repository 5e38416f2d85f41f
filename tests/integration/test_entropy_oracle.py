"""The entropies the engine returns equal a transformers forward pass over prompt +
completion (teacher forcing, full softmax, float32).

Tolerance 1e-3 nats per token: both sides run the same float32 weights, so the only
differences are kernel summation orders (vLLM's CPU attention/matmuls vs transformers'
eager ones), which move logits by ~1e-5 relative; entropy is a smooth function of the
logits with gradient bounded by the logit spread, giving differences of ~1e-5..1e-4 nats.
A real bug (an off-by-one position, a row mix-up between requests, temperature applied
before the processor, a dropped or duplicated token) moves values by 0.1-5 nats.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.data import load_problems

pytestmark = pytest.mark.engine
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
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


def check_traces(response, reference_model):
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


def test_greedy_sixteen_concurrent_requests_match_transformers(client, reference_model):
    problems = load_problems("gsm8k", "test", limit=8)
    out = client.compress([p.question for p in problems], max_tokens=48, temperature=0.0,
                          n=2, answer=False, return_tokens=True)
    assert sum(len(p.traces) for p in out.results) == 16
    worst, checked = check_traces(out, reference_model)
    assert checked >= 16 * 10
    print(f"greedy: {checked} tokens, worst |diff| {worst:.2e} nats")


def test_sampled_with_temperature_is_entropy_at_temperature_one(client, reference_model):
    problems = load_problems("gsm8k", "test", offset=8, limit=4)
    out = client.compress([p.question for p in problems], max_tokens=32, temperature=0.8,
                          top_p=0.9, seed=11, n=3, answer=False, return_tokens=True)
    worst, _ = check_traces(out, reference_model)
    print(f"sampled: worst |diff| {worst:.2e} nats")


def test_stop_string_truncates_to_returned_tokens(client, reference_model):
    problems = load_problems("gsm8k", "test", limit=2)
    out = client.compress([p.question for p in problems], max_tokens=64, temperature=0.0,
                          stop=["\n"], answer=False, return_tokens=True)
    for problem in out.results:
        trace = problem.traces[0]
        assert trace.finish_reason in ("stop", "length")
        assert not math.isnan(sum(trace.tokens.entropies))
    check_traces(out, reference_model)

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

from stepzip.data import load_problems

pytestmark = pytest.mark.engine


def test_greedy_sixteen_concurrent_requests_match_transformers(client, reference_model,
                                                              check_traces):
    problems = load_problems("gsm8k", "test", limit=8)
    out = client.compress([p.question for p in problems], max_tokens=48, temperature=0.0,
                          n=2, answer=False, return_tokens=True)
    assert sum(len(p.traces) for p in out.results) == 16
    worst, checked = check_traces(out, reference_model)
    assert checked >= 16 * 10
    print(f"greedy: {checked} tokens, worst |diff| {worst:.2e} nats")


def test_sampled_with_temperature_is_entropy_at_temperature_one(client, reference_model,
                                                                check_traces):
    problems = load_problems("gsm8k", "test", offset=8, limit=4)
    out = client.compress([p.question for p in problems], max_tokens=32, temperature=0.8,
                          top_p=0.9, seed=11, n=3, answer=False, return_tokens=True)
    worst, _ = check_traces(out, reference_model)
    print(f"sampled: worst |diff| {worst:.2e} nats")


def test_stop_string_truncates_to_returned_tokens(client, reference_model, check_traces):
    problems = load_problems("gsm8k", "test", limit=2)
    out = client.compress([p.question for p in problems], max_tokens=64, temperature=0.0,
                          stop=["\n"], answer=False, return_tokens=True)
    for problem in out.results:
        trace = problem.traces[0]
        assert trace.finish_reason in ("stop", "length")
        assert not math.isnan(sum(trace.tokens.entropies))
    check_traces(out, reference_model)

"""POST /v1/compress end to end against the shared real engine."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time

import httpx
import pytest

from stepzip.data import load_problems

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def gsm8k_response(client):
    problems = load_problems("gsm8k", "test", limit=3)
    out = client.compress([p.question for p in problems], answers=[p.answer for p in problems],
                          variants=[{"strategy": "low", "ratio": 0.5},
                                    {"strategy": "low", "ratio": 0.8}],
                          max_tokens=96, temperature=0.0, return_tokens=True)
    return out


def test_steps_partition_reasoning_tokens(gsm8k_response):
    assert len(gsm8k_response.results) == 3
    for problem in gsm8k_response.results:
        trace = problem.traces[0]
        assert trace.completion_tokens == len(trace.tokens.ids) == len(trace.tokens.entropies)
        assert all(math.isfinite(h) and h >= -1e-6 for h in trace.tokens.entropies)
        steps = trace.steps
        assert steps, "a 96-token trace has at least one step"
        assert steps[0].token_start >= 0
        for a, b in itertools.pairwise(steps):
            assert a.token_end == b.token_start, "steps are contiguous in tokens"
        assert sum(s.tokens for s in steps) == trace.reasoning_tokens
        assert "".join(s.text for s in steps) == trace.reasoning
        for s in steps:
            expected = sum(trace.tokens.entropies[s.token_start:s.token_end])
            assert s.entropy_sum == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_variants_skip_counts_and_answers(gsm8k_response):
    for problem in gsm8k_response.results:
        trace = problem.traces[0]
        n = len(trace.steps)
        by_ratio = {v.ratio: v for v in trace.variants}
        for ratio in (0.5, 0.8):
            v = by_ratio[ratio]
            assert v.n_skipped == math.floor(ratio * n)
            assert len(v.skipped_steps) == v.n_skipped
            assert sorted(v.kept_steps + v.skipped_steps) == list(range(n))
            assert v.compressed_text.count("[SKIP]") == v.n_skipped
            # the lowest-entropy steps are the ones skipped
            kept = [trace.steps[i].entropy_sum for i in v.kept_steps]
            skipped = [trace.steps[i].entropy_sum for i in v.skipped_steps]
            if kept and skipped:
                assert max(skipped) <= min(kept)
            assert v.answer_text is not None, "an answer was generated from the compressed trace"
            assert v.correct is not None
        assert by_ratio[0.8].tokens_after <= by_ratio[0.5].tokens_after + by_ratio[0.8].n_skipped


def test_bad_requests_get_422_naming_the_field(server):
    cases = [
        ({"problems": []}, "problems"),
        ({"problems": [{"text": "x"}], "variants": [{"strategy": "low", "ratio": 1.5}]},
         "variants"),
        ({"problems": [{"text": "x"}], "variants": [{"strategy": "median", "ratio": 0.5}]},
         "strategy"),
        ({"problems": [{"text": "x"}] * 9}, "problems"),
        ({"problems": [{"text": "x"}], "sampling": {"max_tokens": 5000}}, "sampling.max_tokens"),
        ({"problems": [{"text": "   "}]}, "problems.0.text"),
        ({"problems": [{"text": "x"}], "sampling": {"top_p": 0}}, "sampling.top_p"),
        ({"problems": [{"text": "x"}], "bogus": 1}, "bogus"),
    ]
    for body, field in cases:
        r = httpx.post(server.url + "/v1/compress", json=body, timeout=60)
        assert r.status_code == 422, (body, r.text)
        payload = r.json()
        assert any(field in d["field"] for d in payload["details"]), (field, payload)
        assert payload["details"][0]["reason"]
    r = httpx.post(server.url + "/v1/compress", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422


def test_many_concurrent_seeded_top_p_requests_do_not_kill_the_engine(server, client):
    """Regression: vLLM's CPU sampler rewinds a seeded request's torch.Generator by
    offset when its prefill is chunked, which CPU generators cannot do -> EngineDeadError
    ("CPU Generator does not use offset"), whatever the logits processors. The server
    turns chunked prefill off on the CPU. 40 distinct long seeded top-p prompts at once
    (~23k prompt tokens, far over a chunked-prefill step budget) must all succeed."""

    def problems(batch: int) -> list[dict]:
        out = []
        for i in range(8):
            rng = random.Random(batch * 100 + i)
            numbers = " ".join(str(rng.randint(0, 999)) for _ in range(150))
            out.append({"text": f"List {batch}-{i}: {numbers}. Sum the first two."})
        return out

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            return await asyncio.gather(*(http.post("/v1/compress", json={
                "problems": problems(b), "answer": False,
                "sampling": {"max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}})
                for b in range(5)))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 5, responses[0].text
    assert client.health()["status"] == "ok"


def test_health_models_metrics(server, client):
    assert client.health()["status"] == "ok"
    models = client.models()["data"]
    assert models[0]["id"] == "smollm2"
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert "stepzip_requests_total" in text
    assert "stepzip_entropy_fetch_seconds" in text


def test_client_disconnect_aborts_engine_work(server, client):
    """A client that gives up must not leave its requests generating in the engine."""
    body = {"problems": [{"text": f"Write a long story number {i}."} for i in range(4)],
            "sampling": {"max_tokens": 900, "temperature": 1.0}, "answer": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/compress", json=body, timeout=3.0)
    for _ in range(60):  # the server checks for disconnects every second
        if client.health()["unfinished_requests"] == 0:
            break
        time.sleep(0.5)
    assert client.health()["unfinished_requests"] == 0

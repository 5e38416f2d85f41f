"""POST /v1/score against the shared real engine: reasoning that /v1/compress generated,
scored again by teacher forcing, gets the same entropies, steps, variants and answers;
a transformers teacher-forced pass agrees; bad pairs get 4xx naming the field."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from clients.client import StepzipError
from stepzip.data import load_problems
from tests.integration.conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.engine

SAME = 1e-4  # nats: one engine, one processor; only batch composition differs
VARIANTS = [{"strategy": "low", "ratio": 0.5}, {"strategy": "low", "ratio": 0.8},
            {"strategy": "high", "ratio": 0.5}]


@pytest.fixture(scope="module")
def generated(client):
    problems = load_problems("gsm8k", "test", offset=20, limit=3)
    out = client.compress([p.question for p in problems], answers=[p.answer for p in problems],
                          variants=VARIANTS, max_tokens=64, temperature=0.0, answer=True,
                          return_tokens=True)
    return problems, out


@pytest.fixture(scope="module")
def scored(client, generated):
    problems, out = generated
    return client.score([p.question for p in problems],
                        [r.traces[0].tokens.ids for r in out.results],
                        answers=[p.answer for p in problems], ids=[p.id for p in problems],
                        variants=VARIANTS, answer=True, return_tokens=True)


def test_score_of_a_compress_trace_gives_the_same_entropies_and_steps(generated, scored):
    _, out = generated
    assert len(scored.results) == 3 and scored.usage.completion_tokens > 0
    worst = 0.0
    for gen_problem, score_problem in zip(out.results, scored.results):
        assert score_problem.prompt == gen_problem.prompt
        gen, got = gen_problem.traces[0], score_problem.traces[0]
        assert got.finish_reason is None
        assert got.tokens.ids == gen.tokens.ids and got.completion == gen.completion
        diffs = [abs(a - b) for a, b in zip(got.tokens.entropies, gen.tokens.entropies)]
        worst = max(worst, *diffs)
        assert max(diffs) <= SAME, f"max |diff| {max(diffs):.2e} at {diffs.index(max(diffs))}"
        assert [(s.text, s.token_start, s.token_end) for s in got.steps] == \
               [(s.text, s.token_start, s.token_end) for s in gen.steps]
        for a, b in zip(got.steps, gen.steps):
            assert a.entropy_sum == pytest.approx(b.entropy_sum, abs=SAME * b.tokens)
        for a, b in zip(got.variants, gen.variants):
            assert (a.strategy, a.ratio, a.skipped_steps, a.compressed_text) == \
                   (b.strategy, b.ratio, b.skipped_steps, b.compressed_text)
    print(f"score vs compress: worst |diff| {worst:.2e} nats")


def test_text_scores_its_own_tokenization_with_the_same_entropies_up_to_where_it_differs(
        client, generated):
    """A sampled sequence need not be the tokenizer's split of its text: scoring the text
    gives the same completion, and the same entropies until the first token that the
    tokenizer splits differently (from there on the contexts differ)."""
    problems, out = generated
    scored = client.score([p.question for p in problems],
                          [r.traces[0].completion for r in out.results], return_tokens=True)
    for gen_problem, score_problem in zip(out.results, scored.results):
        assert score_problem.traces[0].completion == gen_problem.traces[0].completion
        gen, got = gen_problem.traces[0].tokens, score_problem.traces[0].tokens
        same = next((i for i, (a, b) in enumerate(zip(got.ids, gen.ids)) if a != b),
                    min(len(got.ids), len(gen.ids)))
        assert same > 0
        diffs = [abs(a - b) for a, b in zip(got.entropies[:same], gen.entropies[:same])]
        assert max(diffs) <= SAME


def test_answers_from_scored_variants_match_compress_answers(generated, scored):
    _, out = generated
    for gen_problem, score_problem in zip(out.results, scored.results):
        for a, b in zip(score_problem.traces[0].variants, gen_problem.traces[0].variants):
            assert a.answer_text is not None
            assert (a.answer_text, a.extracted_answer, a.correct) == \
                   (b.answer_text, b.extracted_answer, b.correct)
    assert scored.usage.answer_tokens > 0


def test_scored_entropies_match_a_transformers_teacher_forced_pass(scored, reference_model,
                                                                   check_traces):
    worst, checked = check_traces(scored, reference_model)
    assert checked >= 3 * 32
    print(f"score vs transformers: {checked} tokens, worst |diff| {worst:.2e} nats")


def test_reasoning_the_model_would_not_write_is_scored_as_given(client):
    """Forcing holds even where the model disagrees, including text with a special
    token and a stop string in it."""
    reasoning = "First, 2 + 2 = 5.\nThen purple elephants multiply.<|im_end|>\nThe answer is 9"
    out = client.score(["What is 2 + 2?"], [reasoning], answers=["4"], return_tokens=True)
    trace = out.results[0].traces[0]
    tokens = trace.tokens
    assert len(tokens.ids) == len(tokens.entropies) == trace.completion_tokens
    assert trace.completion == reasoning.replace("<|im_end|>", "")  # decoded, specials skipped
    assert all(h >= -1e-6 for h in tokens.entropies)
    assert trace.extracted_answer == "9" and trace.correct is False


def _post(server, body, **kw):
    return httpx.post(f"{server.url}/v1/score", json=body, timeout=60, **kw)


@pytest.mark.parametrize("pair,field", [
    ({"problem": "1+1?", "reasoning": ""}, "pairs.0.reasoning"),
    ({"problem": "1+1?", "reasoning": " \n "}, "pairs.0.reasoning"),
    ({"problem": "", "reasoning": "2"}, "pairs.0.problem"),
    ({"problem": "1+1?", "reasoning": "word " * (MAX_MODEL_LEN + 10)}, "pairs.0.reasoning"),
    ({"problem": "1+1?", "reasoning_ids": [17] * (MAX_MODEL_LEN + 1)}, "pairs.0.reasoning_ids"),
    ({"problem": "1+1?", "reasoning_ids": [17, 49152]}, "pairs.0.reasoning_ids"),
    ({"problem": "1+1?", "reasoning_ids": [17, -1]}, "pairs.0.reasoning_ids.1"),
    ({"problem": "1+1?", "reasoning": "2", "reasoning_ids": [17]}, "pairs.0"),
])
def test_bad_pairs_get_422_naming_the_field(server, pair, field):
    r = _post(server, {"pairs": [pair]})
    assert r.status_code == 422, r.text
    assert r.json()["details"][0]["field"] == field


def test_too_long_counts_the_prompt_and_the_answer(server):
    words = "word " * (MAX_MODEL_LEN - 200)  # fits with the prompt, not with 300 more
    r = _post(server, {"pairs": [{"problem": "1+1?", "reasoning": words}], "answer": True,
                       "answer_max_tokens": 300})
    assert r.status_code == 422
    detail = r.json()["details"][0]
    assert detail["field"] == "pairs.0.reasoning" and "answer_max_tokens" in detail["reason"]


def test_non_utf8_reasoning_gets_422_naming_the_field(server):
    for raw in (b'{"pairs": [{"problem": "1+1?", "reasoning": "two \xff\xfe"}]}',
                b'{"pairs": [{"problem": "1+1?", "reasoning": "two \\ud800"}]}'):
        r = httpx.post(f"{server.url}/v1/score", content=raw, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["details"][0]["field"] == "pairs.0.reasoning"


def test_too_many_pairs_and_the_client_raises_the_servers_reason(server, client):
    pairs = [{"problem": "1+1?", "reasoning": "2"}] * 9  # the shared server allows 8
    r = _post(server, {"pairs": pairs})
    assert r.status_code == 422 and r.json()["details"][0]["field"] == "pairs"
    with pytest.raises(StepzipError) as err:
        client.score(["1+1?"], ["word " * (MAX_MODEL_LEN + 10)])
    assert err.value.status == 422 and "pairs.0.reasoning" in str(err.value)


def test_build_sft_takes_existing_traces_from_jsonl_through_score(server, generated,
                                                                  tmp_path):
    from trainer.build_sft import build_sft
    from trainer.config import BuildSftConfig

    problems, out = generated
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({
        "id": p.id, "question": p.question, "answer": p.answer,
        "reasoning": r.traces[0].completion}) + "\n" for p, r in zip(problems, out.results)))
    cfg = BuildSftConfig(url=server.url, output=str(tmp_path / "pairs.jsonl"),
                         traces=str(traces), keep="all", answer_from="gold", progress=False,
                         answer_max_tokens=16)
    stats = build_sft(cfg, log=lambda _m: None)
    assert stats.failed_batches == 0
    rows = {r["problem_id"]: r for r in map(json.loads, (tmp_path / "pairs.jsonl").open())}
    for p, result in zip(problems, out.results):
        row, trace = rows[p.id], result.traces[0]
        assert row["prompt"] == result.prompt
        assert row["n_steps"] == len(trace.steps)  # the given reasoning, not a new one
        assert row["n_skipped"] == math.floor(0.8 * len(trace.steps))
        kept = [line for line in row["completion"].split("\n</think>")[0].split("\n")
                if line.strip() and line.strip() != "[SKIP]"]
        assert all(line in trace.reasoning for line in kept)

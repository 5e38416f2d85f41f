"""POST /v1/score against the shared real engine: reasoning that /v1/compress generated,
scored again by teacher forcing, gets the same entropies, steps, variants and answers;
a transformers teacher-forced pass agrees; bad pairs get 4xx naming the field."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clients.client import StepzipError
from clients.launcher import ServerProcess
from stepzip.data import load_problems
from tests.integration.conftest import MAX_MODEL_LEN, reference_entropies

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


def test_the_server_scores_by_prefill(server):
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert (health["scoring"], health["scoring_reason"]) == ("prefill", None)


@pytest.fixture(scope="module")
def sampled_traces(client):
    """n = 2 sampled traces per problem (temperature 0.8), chat-template prompts."""
    problems = load_problems("gsm8k", "test", offset=30, limit=2)
    return problems, client.compress([p.question for p in problems], variants=VARIANTS, n=2,
                                     max_tokens=64, temperature=0.8, seed=5, answer=False,
                                     return_tokens=True)


def _same_steps_and_variants(got, gen) -> None:
    assert [(s.text, s.token_start, s.token_end) for s in got.steps] == \
           [(s.text, s.token_start, s.token_end) for s in gen.steps]
    for a, b in zip(got.variants, gen.variants, strict=True):
        assert (a.strategy, a.ratio, a.skipped_steps, a.compressed_text) == \
               (b.strategy, b.ratio, b.skipped_steps, b.compressed_text)


def test_prefill_entropies_of_n2_and_greedy_traces_match_generation_and_transformers(
        client, generated, sampled_traces, reference_model):
    """Prefill-scored entropies against the engine's own while sampling (what teacher
    forcing reproduces: the entropy processor on decode steps) and a float64
    transformers pass: within 1e-4 nats on >= 200 tokens of greedy and n = 2 sampled
    traces after chat-template prompts; steps and variants identical."""
    model, tokenizer = reference_model
    traces = [(q.question, problem, trace)
              for problems, out in (generated, sampled_traces)
              for q, problem in zip(problems, out.results) for trace in problem.traces]
    scored = client.score([q for q, _, _ in traces], [t.tokens.ids for _, _, t in traces],
                          variants=VARIANTS, return_tokens=True)
    worst_gen = worst_ref = 0.0
    checked = 0
    for (_, problem, gen), got_problem in zip(traces, scored.results, strict=True):
        assert got_problem.prompt == problem.prompt
        assert "<|im_start|>assistant" in problem.prompt  # the model's chat template
        got = got_problem.traces[0]
        assert got.tokens.ids == gen.tokens.ids
        prompt_ids = tokenizer.encode(problem.prompt, add_special_tokens=False)
        reference = reference_entropies(model, prompt_ids, gen.tokens.ids)
        for value, sampled, ref in zip(got.tokens.entropies, gen.tokens.entropies, reference,
                                       strict=True):
            worst_gen = max(worst_gen, abs(value - sampled))
            worst_ref = max(worst_ref, abs(value - ref))
        checked += len(gen.tokens.ids)
        _same_steps_and_variants(got, gen)
    print(f"prefill vs generation: worst {worst_gen:.2e}; vs transformers: worst "
          f"{worst_ref:.2e} nats ({checked} tokens)")
    assert checked >= 200 and worst_gen <= SAME and worst_ref <= SAME


def test_sampled_step_scores_match_compress(client):
    """step_score "sampled" from /v1/score: each given token's logprob under the model's
    own distribution (never the forced 0), as /v1/compress reports for its trace."""
    problems = load_problems("gsm8k", "test", offset=40, limit=2)
    questions = [p.question for p in problems]
    out = client.compress(questions, variants=VARIANTS, max_tokens=48, temperature=0.0,
                          answer=False, return_tokens=True, step_score="sampled")
    scored = client.score(questions, [r.traces[0].tokens.ids for r in out.results],
                          variants=VARIANTS, return_tokens=True, step_score="sampled")
    for gen_problem, got_problem in zip(out.results, scored.results, strict=True):
        gen, got = gen_problem.traces[0], got_problem.traces[0]
        diffs = [abs(a - b) for a, b in zip(got.tokens.logprobs, gen.tokens.logprobs,
                                            strict=True)]
        assert max(diffs) <= SAME, f"max |diff| {max(diffs):.2e}"
        assert min(got.tokens.logprobs) < -0.01  # not the forced logit's 0
        for a, b in zip(got.steps, gen.steps, strict=True):
            assert a.score == pytest.approx(b.score, abs=SAME)
        assert any(step.score > 0 for step in got.steps)
        _same_steps_and_variants(got, gen)


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



SCORE_TRACES = 16


def _score_command(url: str, traces: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "score", "--input", str(traces), "--output",
            str(out), "--url", url, "--batch-size", "1", "--concurrency", "1", "--no-progress"]


def _scored_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]  # polled mid-write: a partial line is no result
    return [json.loads(line)["id"] for line in complete.splitlines() if line.strip()]


def test_bulk_score_cli_killed_and_rerun_scores_each_trace_once(server, client, generated,
                                                                tmp_path):
    """`stepzip score` SIGKILLed once its first trace is written, then rerun: every trace
    once in scored.jsonl and sft.jsonl, with the entropies /v1/score gives."""
    problems, out = generated
    traces = tmp_path / "traces.jsonl"
    rows = [{"id": f"t{i}", "problem": problems[i % 3].question,
             "answer": problems[i % 3].answer,
             **({"reasoning_ids": out.results[i % 3].traces[0].tokens.ids} if i % 2 else
                {"reasoning": out.results[i % 3].traces[0].completion})}
            for i in range(SCORE_TRACES)]
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "out" / "scored.jsonl"
    command = _score_command(server.url, traces, tmp_path / "out")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _scored_ids(scored) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    after_kill = _scored_ids(scored)
    assert 0 < len(after_kill) < SCORE_TRACES, "the kill must land mid-run"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(_scored_ids(scored)) == sorted(r["id"] for r in rows)
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").open()]
    assert sorted(r["problem_id"] for r in sft) == sorted(r["id"] for r in rows)
    by_id = {json.loads(line)["id"]: json.loads(line) for line in scored.open()}
    direct = client.score([problems[1].question], [out.results[1].traces[0].tokens.ids],
                          return_tokens=True).results[0].traces[0]
    row = by_id["t1"]["trace"]
    assert row["tokens"]["ids"] == direct.tokens.ids
    assert max(abs(a - b) for a, b in zip(row["tokens"]["entropies"],
                                          direct.tokens.entropies)) <= SAME


# Last in the file: it starts a second engine beside the shared one, the moment this busy
# machine is shortest of memory; earlier tests then have their results.
LONG_TRACE = 8000  # tokens; the tiny model takes 8,192 positions
PEAK_GROWTH_LIMIT = 2**30  # bytes of worker peak RSS growth allowed for one long trace


@pytest.fixture(scope="module")
def tiny_server():
    """The overhead-bound tiny model (clients/bench.py `--model tiny`) at its full length."""
    from clients.bench import TINY, model_folder

    argv = ["serve", "--model", model_folder(TINY), "--dtype", "float32",
            "--max-model-len", "8192", "--max-num-seqs", "4", "--kv-cache-gib", "1"]
    with ServerProcess(argv, timeout=600) as proc:
        yield proc


def _worker(server_pid: int):
    import psutil

    workers = [p for p in psutil.Process(server_pid).children(recursive=True)
               if "Worker" in p.name()]
    assert len(workers) == 1, [p.name() for p in workers]
    return workers[0]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def test_an_8000_token_trace_is_scored_in_bounded_worker_memory(tiny_server):
    """One prefill of 8,000 reasoning tokens on a 49,152-token vocabulary: all its logits
    at once would be 1.5 GiB of float32 (twice that with the log-softmax vLLM's own
    prompt logprobs take); chunked (CHUNK_BYTES) the worker's peak grows by far less."""
    worker = _worker(tiny_server.proc.pid)
    ids = [(7 * i) % 40_000 + 100 for i in range(LONG_TRACE)]
    with open(f"/proc/{worker.pid}/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) restarts from the current RSS
    before = _status_kib(worker.pid, "VmRSS")
    r = httpx.post(f"{tiny_server.url}/v1/score", timeout=600, json={
        "pairs": [{"problem": "1+1?", "reasoning_ids": ids}], "step_score": "sampled",
        "return_tokens": True})
    assert r.status_code == 200, r.text
    tokens = r.json()["results"][0]["traces"][0]["tokens"]
    assert len(tokens["entropies"]) == len(tokens["logprobs"]) == LONG_TRACE
    assert all(0 <= h <= math.log(49_152) + 1e-3 for h in tokens["entropies"])
    growth = (_status_kib(worker.pid, "VmHWM") - before) * 1024
    print(f"worker peak RSS growth scoring {LONG_TRACE} tokens: {growth / 2**20:.0f} MiB")
    assert growth < PEAK_GROWTH_LIMIT

"""`stepzip eval` without an engine (clients/eval.py): the grid, the per-problem rows,
the numbers recomputed from the rows, and a killed run resumed with the real resume code.

The client here answers like a server would (real request/response schemas, steps cut
by the same pure code); the real server runs in tests/integration/test_eval_server.py.
"""

from __future__ import annotations

import json
import re
import zlib

import pytest

from clients.eval import (
    CONFIG,
    FIG_KAPPA,
    FIG_TOKENS,
    RESULTS,
    SUMMARY,
    EvalConfig,
    bootstrap_ci,
    evaluate_problem,
    grid,
    run_eval,
)
from stepzip.constants import LINE_DELIMITER, MARKER
from stepzip.data import Problem
from stepzip.schemas import compress as schemas
from stepzip.steps import reasoning_span, segment, token_char_offsets

PROMPT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


def _completion(question: str) -> str:
    n = 2 + len(question) % 4
    lines = [f"Step {i}: {question} gives {i * 7} apples." for i in range(n)]
    return "\n".join(lines) + "\nThe answer is 14."


class FakeServer:
    """/v1/compress and /v1/completions as a stepzip server shapes them."""

    def __init__(self) -> None:
        self.compress_calls: list[str] = []
        self.answer_prompts: list[list[str]] = []

    def compress_request(self, req: schemas.CompressRequest) -> schemas.CompressResponse:
        problem = req.problems[0]
        self.compress_calls.append(problem.id)
        text = _completion(problem.text)
        pieces = re.findall(r"[^ \n]+[ \n]*", text)
        entropies = [zlib.crc32(p.encode()) % 97 / 31 for p in pieces]
        offsets = token_char_offsets(pieces)
        span = reasoning_span(text)
        steps = segment(text, offsets, entropies, delimiter=LINE_DELIMITER, span=span)
        trace = schemas.TraceOut(
            sample=0, completion=text, reasoning=text[span[0]:span[1]], finish_reason="stop",
            steps=[schemas.StepOut.from_step(s) for s in steps], variants=[],
            answer_text=text[span[1]:], extracted_answer="14", correct=problem.answer == "14",
            completion_tokens=len(pieces), reasoning_tokens=sum(s.n_tokens for s in steps),
            entropy_total=sum(entropies),
            tokens=schemas.TokenOut(ids=list(range(len(pieces))), entropies=entropies,
                                    pieces=pieces))
        return schemas.CompressResponse(
            model="fake", delimiter=LINE_DELIMITER, usage=schemas.Usage(),
            timings=schemas.Timings(),
            results=[schemas.ProblemOut(id=problem.id, prompt=PROMPT.format(q=problem.text),
                                        gold=problem.answer, traces=[trace])])

    def completions(self, body: dict) -> dict:
        self.answer_prompts.append(body["prompt"])
        assert body["temperature"] == 0.0 and body["stop"] == [LINE_DELIMITER]
        # Answers drift as more is pruned: 14 with little gone, 7 with more, none at all.
        texts = [" 14." if p.count(MARKER) < 2 else " 7." if p.count(MARKER) < 4 else " ?"
                 for p in body["prompt"]]
        return {"choices": [{"index": i, "text": t, "finish_reason": "stop"}
                            for i, t in enumerate(texts)]}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception`."""


class DiesAfter(FakeServer):
    def __init__(self, answered: int) -> None:
        super().__init__()
        self.left = answered

    def completions(self, body: dict) -> dict:
        if self.left == 0:
            raise Killed
        self.left -= 1
        return super().completions(body)


PROBLEMS = [Problem(f"p{i}", f"Q{'x' * i}", "14" if i % 3 else "7", "fake") for i in range(7)]


def _cfg(tmp_path, **kw) -> EvalConfig:
    base = {"output": str(tmp_path / "out"), "ratios": (0.0, 0.3, 0.5, 1.0),
            "random_seeds": 2, "concurrency": 2, "bootstrap": 200, "progress": False}
    return EvalConfig(**{**base, **kw})


def _rows(tmp_path) -> list[dict]:
    lines = (tmp_path / "out" / RESULTS).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_grid_has_every_strategy_ratio_and_random_seed(tmp_path) -> None:
    cells = grid(_cfg(tmp_path))
    assert len(cells) == 4 * (4 + 2)  # random twice
    assert {c.strategy for c in cells} == {"low", "high", "random", "token", "adaptive"}
    adaptive = next(c for c in cells if c.strategy == "adaptive" and c.ratio == 0.5)
    assert adaptive.spec().mass == 0.5 and adaptive.spec().ratio is None


def test_identical_compressed_texts_are_answered_once(tmp_path) -> None:
    server = FakeServer()
    row = evaluate_problem(server, PROBLEMS[3], 3, _cfg(tmp_path))
    [prompts] = server.answer_prompts
    assert len(prompts) == len(set(prompts)) == row["answered_texts"]
    assert len(prompts) < len(row["samples"][0]["cells"])  # kappa=0 cells share one text
    for cell in row["samples"][0]["cells"]:
        if cell["ratio"] == 0.0:
            assert cell["preserved"] and cell["tokens_kept"] == cell["tokens_before"]


def test_many_answers_are_split_over_requests(tmp_path, monkeypatch) -> None:
    import clients.eval

    in_one_request = evaluate_problem(FakeServer(), PROBLEMS[3], 3, _cfg(tmp_path))
    monkeypatch.setattr(clients.eval, "ANSWERS_PER_REQUEST", 3)
    server = FakeServer()
    row = evaluate_problem(server, PROBLEMS[3], 3, _cfg(tmp_path))
    assert [len(p) for p in server.answer_prompts[:-1]] == [3] * (len(server.answer_prompts) - 1)
    assert sum(map(len, server.answer_prompts)) == row["answered_texts"] > 3
    assert row == in_one_request


def test_cells_grade_and_compare_with_the_full_reasoning_answer(tmp_path) -> None:
    row = evaluate_problem(FakeServer(), PROBLEMS[1], 1, _cfg(tmp_path))
    sample = row["samples"][0]
    assert sample["full"]["answer"] == "14" and sample["full"]["correct"]
    everything = [c for c in sample["cells"] if c["strategy"] == "low" and c["ratio"] == 1.0]
    [cell] = everything
    assert cell["tokens_kept"] == 0 and cell["n_skipped"] == sample["n_steps"]
    assert sample["n_steps"] == 4 and cell["answer"] == "?"
    assert cell["preserved"] is False and cell["correct"] is False


def test_summary_cells_recomputed_independently_from_the_rows(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    summary = run_eval(cfg, FakeServer(), problems=PROBLEMS, log=lambda _m: None)
    rows = _rows(tmp_path)
    assert sorted(r["id"] for r in rows) == [p.id for p in PROBLEMS]
    assert summary["n_problems"] == len(PROBLEMS)
    for cell in summary["cells"]:
        per_problem = {"accuracy": [], "preservation": [], "reduction": []}
        for row in rows:
            mine = [c for c in row["samples"][0]["cells"]
                    if (c["strategy"], c["ratio"]) == (cell["strategy"], cell["ratio"])]
            assert len(mine) == (2 if cell["strategy"] == "random" else 1)
            per_problem["accuracy"].append(sum(c["correct"] for c in mine) / len(mine))
            per_problem["preservation"].append(sum(c["preserved"] for c in mine) / len(mine))
            per_problem["reduction"].append(
                sum(1 - c["tokens_kept"] / c["tokens_before"] for c in mine) / len(mine))
        for metric, values in per_problem.items():
            mean = sum(values) / len(values)
            assert cell[metric] == pytest.approx(mean, abs=1e-12)
            low, high = cell[f"{metric}_ci"]
            assert min(values) - 1e-12 <= low <= mean <= high <= max(values) + 1e-12
    kappa0 = [c for c in summary["cells"] if c["ratio"] == 0.0]
    assert all(c["preservation"] == 1.0 and c["reduction"] == 0.0 for c in kappa0)
    out = tmp_path / "out"
    assert json.loads((out / SUMMARY).read_text())["cells"] == summary["cells"]
    for name in (FIG_KAPPA, FIG_TOKENS):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_run_resumes_with_each_problem_exactly_once(tmp_path) -> None:
    cfg = _cfg(tmp_path, concurrency=1)
    with pytest.raises(Killed):
        run_eval(cfg, DiesAfter(answered=3), problems=PROBLEMS, log=lambda _m: None)
    first = [r["id"] for r in _rows(tmp_path)]
    assert first == ["p0", "p1", "p2"]
    # A kill in the middle of a write leaves half a line; the rerun cuts it off.
    with (tmp_path / "out" / RESULTS).open("a") as f:
        f.write('{"id": "p3", "row": 3, "samp')
    server = FakeServer()
    run_eval(cfg, server, problems=PROBLEMS, log=lambda _m: None)
    ids = [r["id"] for r in _rows(tmp_path)]
    assert sorted(ids) == [p.id for p in PROBLEMS] and len(ids) == len(set(ids))
    assert server.compress_calls == ["p3", "p4", "p5", "p6"]  # finished ones not asked again


def test_rerun_with_more_problems_only_runs_the_new_ones(tmp_path) -> None:
    run_eval(_cfg(tmp_path), FakeServer(), problems=PROBLEMS[:2], log=lambda _m: None)
    server = FakeServer()
    summary = run_eval(_cfg(tmp_path), server, problems=PROBLEMS[:4], log=lambda _m: None)
    assert server.compress_calls == ["p2", "p3"] and summary["n_problems"] == 4


def test_other_settings_in_the_same_folder_are_refused(tmp_path) -> None:
    run_eval(_cfg(tmp_path), FakeServer(), problems=PROBLEMS[:1], log=lambda _m: None)
    assert json.loads((tmp_path / "out" / CONFIG).read_text())["ratios"] == [0.0, 0.3, 0.5, 1.0]
    with pytest.raises(ValueError, match="output: .* other max_tokens, ratios"):
        run_eval(_cfg(tmp_path, ratios=(0.0, 1.0), max_tokens=9), FakeServer(),
                 problems=PROBLEMS[:1], log=lambda _m: None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("strategies", ("low", "median"), "strategies"), ("ratios", (0.5, 1.5), "ratios"),
     ("samples", 0, "samples"), ("bootstrap", 10, "bootstrap")],
)
def test_bad_settings_name_the_field(tmp_path, field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, **{field: value})


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean() -> None:
    values = [0.0] * 30 + [1.0] * 10
    low, high = bootstrap_ci(values, 1000)
    assert (low, high) == tuple(bootstrap_ci(values, 1000))
    assert 0.1 < low < 0.25 < high < 0.4
    assert bootstrap_ci([1.0] * 5, 500) == [1.0, 1.0]


def test_cli_accepts_repeated_and_comma_separated_urls() -> None:
    from clients.cli import build_parser
    from clients.client import parse_urls

    args = build_parser().parse_args(
        ["eval", "--url", "http://a:1,http://b:2", "--url", "http://c:3", "--ratios", "0,0.5"])
    assert parse_urls(args.url) == ["http://a:1", "http://b:2", "http://c:3"]
    from clients.eval import config_from_args

    cfg = config_from_args(args)
    assert cfg.ratios == (0.0, 0.5) and cfg.output == "eval-svamp"

"""`stepzip eval` against the shared real server: a run killed with SIGKILL and rerun ends
with each problem exactly once, and every summary cell is recomputed here from the JSONL
rows. Also the /v1/compress fields the eval relies on (token pieces, step scores, a
reduction of exactly 0 when nothing is pruned)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepzip.data import load_problems

pytestmark = pytest.mark.engine

LIMIT = 4
RATIOS = (0.0, 0.5, 1.0)
SEEDS = 2


def _eval_command(url: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "eval", "--url", url, "--dataset", "svamp",
            "--limit", str(LIMIT), "--ratios", ",".join(map(str, RATIOS)),
            "--random-seeds", str(SEEDS), "--max-tokens", "48", "--answer-max-tokens", "16",
            "--concurrency", "1", "--bootstrap", "200", "--no-progress", "--output", str(out)]


def _ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]  # polled mid-write: a partial line is no result
    return [json.loads(line)["id"] for line in complete.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def eval_run(server, tmp_path_factory):
    """Start an eval, SIGKILL it once its first problem is written, rerun it to the end."""
    out = tmp_path_factory.mktemp("eval")
    results = out / "results.jsonl"
    proc = subprocess.Popen(_eval_command(server.url, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _ids(results) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    after_kill = _ids(results)
    rerun = subprocess.run(_eval_command(server.url, out), capture_output=True, text=True,
                           timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return out, after_kill, rerun.stdout


def test_killed_and_rerun_eval_has_each_problem_exactly_once(eval_run):
    out, after_kill, stdout = eval_run
    assert 0 < len(after_kill) < LIMIT, "the kill must land after the first problem, before the last"
    ids = _ids(out / "results.jsonl")
    expected = [p.id for p in load_problems("svamp", limit=LIMIT)]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert f"{len(after_kill)} already done" in stdout


def _per_problem(row: dict, strategy: str, ratio: float) -> tuple[float, float, float]:
    cells = [c for s in row["samples"] for c in s["cells"]
             if c["strategy"] == strategy and c["ratio"] == ratio]
    assert len(cells) == (SEEDS if strategy == "random" else 1)
    n = len(cells)
    return (sum(bool(c["correct"]) for c in cells) / n,
            sum(bool(c["preserved"]) for c in cells) / n,
            sum(1 - c["tokens_kept"] / c["tokens_before"] if c["tokens_before"] else 0.0
                for c in cells) / n)


def test_every_cell_recomputed_from_the_rows(eval_run):
    out, _, stdout = eval_run
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_problems"] == LIMIT
    assert len(summary["cells"]) == 5 * len(RATIOS)
    for cell in summary["cells"]:
        values = [_per_problem(r, cell["strategy"], cell["ratio"]) for r in rows]
        for k, metric in enumerate(("accuracy", "preservation", "reduction")):
            mean = sum(v[k] for v in values) / len(values)
            assert cell[metric] == pytest.approx(mean, abs=1e-12), (cell, metric)
            low, high = cell[f"{metric}_ci"]
            assert low - 1e-12 <= mean <= high + 1e-12
        if cell["ratio"] == 0.0:
            assert cell["preservation"] == 1.0 and cell["reduction"] == 0.0
        if cell["ratio"] == 1.0 and cell["strategy"] != "adaptive":
            assert cell["reduction"] == 1.0
    full = [r["samples"][0]["full"]["correct"] for r in rows]
    assert summary["full_accuracy"] == pytest.approx(sum(map(bool, full)) / LIMIT)
    for name in summary["files"]["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "answer kept %" in stdout


def test_untouched_reasoning_reduces_by_exactly_zero(client):
    out = client.compress(["Tom has 3 apples and buys 4 more. How many apples?"],
                          variants=[{"strategy": s, "ratio": 0.0} for s in ("low", "token")],
                          max_tokens=40, answer=False)
    trace = out.results[0].traces[0]
    for v in trace.variants:
        assert v.compressed_text == trace.reasoning
        assert v.tokens_after == v.tokens_before and v.reduction == 0.0


def test_sampled_step_score_is_the_mean_of_minus_p_log_p(client):
    out = client.compress(["A shop sells 12 pens a day. How many in 5 days?"],
                          variants=[{"strategy": "low", "ratio": 0.5}], max_tokens=40,
                          answer=False, return_tokens=True, step_score="sampled")
    trace = out.results[0].traces[0]
    tokens = trace.tokens
    assert "".join(tokens.pieces) == trace.completion
    assert len(tokens.logprobs) == len(tokens.ids)
    assert all(lp <= 0.0 for lp in tokens.logprobs)
    for step in trace.steps:
        values = [-math.exp(lp) * lp for lp in tokens.logprobs[step.token_start:step.token_end]]
        assert step.score == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12)
    pruned = trace.variants[0].skipped_steps
    kept = trace.variants[0].kept_steps
    if pruned and kept:
        assert max(trace.steps[i].score for i in pruned) <= min(trace.steps[i].score
                                                                for i in kept)


def test_paper_code_eval_runs_and_records_its_rules(server, tmp_path):
    from stepzip import papercode

    out = tmp_path / "paper-code"
    command = [sys.executable, "-m", "clients.cli", "eval", "--url", server.url,
               "--dataset", "svamp", "--limit", "2", "--ratios", "0,0.8",
               "--strategies", "low,high", "--max-tokens", "48", "--answer-max-tokens", "16",
               "--concurrency", "1", "--bootstrap", "100", "--no-progress",
               "--output", str(out), "--preset", "paper-code"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rules"] == json.loads(json.dumps(papercode.rules()))
    settings = summary["settings"]
    assert (settings["preset"], settings["temperature"], settings["step_score"]) == (
        "paper-code", 0.6, "sampled")
    assert papercode.NO_THINK_NOTE in summary["notes"]  # the default model is not thinking
    assert papercode.LOGPROBS_NOTE in summary["notes"]  # the shared server: processed
    assert summary["n_problems"] == 2


def test_paper_code_compress_follows_the_scripts(client):
    out = client.compress(["Tom has 3 apples and buys 4 more. Then he eats 2. How many?"],
                          variants=[{"strategy": "low", "ratio": 0.8}], max_tokens=64,
                          answer=False, return_tokens=True, preset="paper-code")
    assert out.notes and out.delimiter == "\n\n"
    trace = out.results[0].traces[0]
    pieces, logprobs = trace.tokens.pieces, trace.tokens.logprobs
    n_reasoning = len(trace.reasoning)
    expected, text, scores, used = {}, "", [], 0
    for piece, logprob in zip(pieces, logprobs, strict=True):  # the scripts' loop
        used += len(piece)
        if used > n_reasoning:
            break
        text += piece
        if piece == "\n\n":
            expected[text.strip()] = sum(scores) / len(scores) if scores else 0.0
            text, scores = "", []
        else:
            scores.append(-math.exp(logprob) * logprob)
    if text:
        expected[text.strip()] = sum(scores) / len(scores)
    keys = [step.text.strip() for step in trace.steps]
    assert keys == list(expected)
    assert [step.score for step in trace.steps] == pytest.approx(list(expected.values()),
                                                                 abs=1e-12)
    variant = trace.variants[0]
    pruned = set(variant.skipped_steps)
    assert variant.n_skipped == int(len(keys) * 0.8)
    assert variant.compressed_text == "".join("[SKIP]" if i in pruned else key
                                              for i, key in enumerate(keys))

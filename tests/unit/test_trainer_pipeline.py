"""The pipeline's own pieces without an engine: server start with progress lines, the
held-out evaluation (grading rule, counts, intervals), its range, the ablation's config,
the demo's guards."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from stepzip.rewards import RewardConfig
from trainer import heldout, pipeline
from trainer.config import BuildSftConfig, GrpoRunConfig, PipelineConfig, with_preset


class SlowServer:
    """ServerProcess's surface: start() blocks until ready; tail() is its log."""

    url = "http://127.0.0.1:1"
    log_path = "/tmp/x.log"

    def __init__(self, fail: bool = False):
        self.fail, self.release = fail, threading.Event()

    def start(self) -> None:
        self.release.wait(5)
        if self.fail:
            raise RuntimeError("engine died")

    def tail(self, n: int = 60) -> str:
        return 'INFO loading weights\nINFO:  127.0.0.1 - "GET /health HTTP/1.1" 503\n'


def test_server_start_says_what_it_waits_for() -> None:
    server, lines = SlowServer(), []
    threading.Timer(0.3, server.release.set).start()
    pipeline.start_server(server, "GRPO", lines.append, every=0.05)
    waiting = [line for line in lines if "waiting" in line]
    assert waiting and all("INFO loading weights" in line for line in waiting)
    assert "ready" in lines[-1]


def test_server_start_failure_is_raised() -> None:
    server = SlowServer(fail=True)
    server.release.set()
    with pytest.raises(RuntimeError, match="engine died"):
        pipeline.start_server(server, "GRPO", lambda m: None, every=0.05)


class Problem:
    def __init__(self, id: str, answer: str):
        self.id, self.answer, self.question = id, answer, f"q{id}"


def fake_completions(texts: list[str]):
    """StepzipClient's surface, answering prompts in order with `texts`."""
    bodies: list[dict] = []

    class Client:
        def __init__(self, url):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def completions(self, body):
            bodies.append(body)
            return {"choices": [{"index": i, "text": texts[int(p[1:])],
                                 "token_ids": list(range(len(texts[int(p[1:])].split())))}
                                for i, p in reversed(list(enumerate(body["prompt"])))]}

    return Client, bodies


def test_heldout_grades_closed_answers_after_the_tag_and_plain_ones_whole(monkeypatch) -> None:
    texts = ["a\n[SKIP]\nb\n</think>\n\nThe answer is 7.",   # closed, right
             "a\nb\nThe answer is 7.",                         # unclosed, right
             "[SKIP]\n[SKIP]\nc\n</think>\n\nThe answer is 8.",  # closed, wrong
             "The answer is 7.\n</think>\n\nThe answer is 9."]  # right before the tag only
    client, bodies = fake_completions(texts)
    monkeypatch.setattr(heldout, "StepzipClient", client)
    monkeypatch.setattr(heldout, "REQUEST_PROMPTS", 3)
    problems = [Problem(str(i), "7") for i in range(4)]
    rows, summary = heldout.evaluate("http://x", problems, [f"p{i}" for i in range(4)],
                                     RewardConfig(step_delimiter="\n"), max_tokens=16)
    assert [r["correct"] for r in rows] == [True, True, False, False]
    assert [r["closed"] for r in rows] == [True, False, True, True]
    assert [r["skips"] for r in rows] == [1, 0, 2, 0]
    assert rows[0]["skip_ratio"] == pytest.approx(1 / 3)
    assert rows[2]["skip_ratio"] == pytest.approx(2 / 3)
    assert [r["tokens"] for r in rows] == [len(t.split()) for t in texts]
    assert len(bodies) == 2 and bodies[0]["temperature"] == 0.0
    assert bodies[0]["return_token_ids"] is True
    assert summary["accuracy"]["mean"] == 0.5 and summary["accuracy_closed"]["mean"] == 0.25
    assert summary["marker_share"]["mean"] == 0.5 and summary["closed"]["mean"] == 0.75
    low, high = summary["accuracy"]["ci"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert "accuracy 50.0 %" in heldout.summary_line("after_sft", summary)


def test_paired_delta_compares_the_same_problems() -> None:
    before = [{"id": str(i), "correct": i < 5} for i in range(20)]
    after = [{"id": str(i), "correct": i < 15} for i in reversed(range(20))]
    delta = heldout.paired_delta(before, after)
    assert delta["mean"] == pytest.approx(0.5) and delta["problems"] == 20
    assert 0.2 < delta["ci"][0] < 0.5 < delta["ci"][1] < 0.8
    same = heldout.paired_delta(before, before)
    assert same["mean"] == 0.0 and same["ci"] == [0.0, 0.0]


def test_heldout_range_refuses_problems_a_stage_trains_on() -> None:
    build = BuildSftConfig(dataset="asdiv", split="test", limit=512)
    grpo = GrpoRunConfig(dataset="asdiv", split="test", offset=1024, limit=64)
    assert pipeline.heldout_range(PipelineConfig(heldout=256), build, grpo) == (1088, 256)
    assert pipeline.heldout_range(PipelineConfig(heldout=256, heldout_offset=1836), build,
                                  grpo) == (1836, 256)
    with pytest.raises(ValueError, match="overlap those build-sft uses"):
        pipeline.heldout_range(PipelineConfig(heldout=10, heldout_offset=500), build, grpo)
    with pytest.raises(ValueError, match="overlap those grpo uses"):
        pipeline.heldout_range(PipelineConfig(heldout=10, heldout_offset=1080), build, grpo)
    other = BuildSftConfig(dataset="gsm8k", split="train", limit=None)
    assert pipeline.heldout_range(PipelineConfig(heldout=10, heldout_offset=0), other,
                                  GrpoRunConfig(dataset="asdiv", split="test", offset=100,
                                                limit=5)) == (0, 10)
    with pytest.raises(ValueError, match="--heldout-offset"):
        pipeline.heldout_range(PipelineConfig(heldout=10), build,
                               GrpoRunConfig(dataset="asdiv", limit=None))


def test_ablation_is_the_same_run_with_correctness_and_skip_ratio_only(tmp_path) -> None:
    grpo = with_preset(GrpoRunConfig, "cpu-demo")
    ablation = pipeline.ablation_config(grpo, tmp_path)
    assert ablation.reward.enabled() == ("correctness", "skip_ratio")
    assert grpo.reward.enabled() == ("correctness", "skip_ratio", "skip_count", "length")
    assert ablation.output_dir == str(tmp_path / pipeline.ABLATION_DIR)
    assert dataclasses.replace(ablation, output_dir=grpo.output_dir, save_final=True,
                               reward=grpo.reward) == grpo


def test_cpu_demo_guards_can_fire_within_its_budget() -> None:
    """A guard that no completion of the budget can trip is no guard (issue 23)."""
    grpo = with_preset(GrpoRunConfig, "cpu-demo")
    assert grpo.reward.max_completion_tokens < grpo.max_completion_length
    # "[SKIP]\n" is 2 tokens: a budget-long flood of markers exceeds max_skips
    assert grpo.reward.max_skips < grpo.max_completion_length // 2
    assert with_preset(BuildSftConfig, "cpu-demo").keep == "correct"
    demo = with_preset(PipelineConfig, "cpu-demo")
    assert demo.heldout >= 200 and demo.ablation


def test_heldout_table_and_plot(tmp_path) -> None:
    s = {"problems": 3, "accuracy": {"mean": 0.1, "ci": [0.0, 0.2]},
         "tokens": {"mean": 40.0, "ci": [35.0, 45.0]},
         "marker_share": {"mean": 0.5, "ci": [0.4, 0.6]},
         "skip_ratio": {"mean": 0.3, "ci": [0.2, 0.4]}, "closed": {"mean": 1.0, "ci": [1, 1]}}
    text = pipeline.table({"before_sft": s, "after_grpo": s})
    assert "| after_grpo |  | 10.0 [0.0, 20.0] | 40.0 [35.0, 45.0] | 50.0 [40.0, 60.0] |" in text
    png = heldout.plot({"before_sft": s, "after_grpo": s}, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_guard_rates_are_the_share_of_completions_penalised(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "rewards/length/mean": -0.5, "rewards/skip_count/mean": 0.0}\n'
                    '{"step": 2, "rewards/length/mean": -0.25, "rewards/skip_count/mean": -1.0}\n')
    rates = pipeline.guard_rates(path, RewardConfig())
    assert rates == {"length": pytest.approx(0.375), "skip_count": pytest.approx(0.25)}
    assert pipeline.guard_rates(path, RewardConfig(length=False, skip_count=False)) == {
        "length": None, "skip_count": None}


def test_comparison_pairs_each_policy_with_the_earlier_baselines() -> None:
    rows = {name: [{"id": str(i), "correct": i < right, "tokens": 10 * right,
                    "with_marker": False} for i in range(10)]
            for name, right in (("before_sft", 1), ("after_sft", 4), ("after_grpo", 2))}
    paired = pipeline.comparison(rows, {name: {} for name in rows})
    assert list(paired) == ["after_sft - before_sft", "after_grpo - before_sft",
                            "after_grpo - after_sft"]
    assert paired["after_grpo - after_sft"]["correct"]["mean"] == pytest.approx(-0.2)
    assert paired["after_sft - before_sft"]["tokens"]["mean"] == pytest.approx(30.0)

"""`--report-to`: TRL's logs reach the tracker. TensorBoard, offline: a GRPO run against
the in-process fake server writes event files holding every reward component, the skip
ratio and the accuracy."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")

from test_trainer_grpo import FakeServer, tiny_policy  # noqa: F401 - tiny_policy: a fixture

from clients.cli import build_parser
from stepzip.data import Problem
from trainer.config import GrpoRunConfig, SftRunConfig, from_args


def test_report_to_is_a_flag_of_both_training_stages() -> None:
    parser = build_parser()
    for stage, cls in (("sft", SftRunConfig), ("grpo", GrpoRunConfig)):
        assert from_args(cls, parser.parse_args(["train", stage])).report_to == "none"
        args = parser.parse_args(["train", stage, "--report-to", "tensorboard"])
        assert from_args(cls, args).report_to == "tensorboard"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "grpo", "--report-to", "mlflow"])


def test_grpo_tensorboard_events_hold_rewards_skip_ratio_accuracy(
        tmp_path, tiny_policy, monkeypatch) -> None:  # noqa: F811 - the imported fixture
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer import grpo

    folder, tok = tiny_policy
    run_dir = tmp_path / "run"
    fake = FakeServer(tok, run_dir)
    monkeypatch.setattr(grpo, "StepzipClient", lambda *a, **k: fake)
    problems = [Problem(id=f"p{i}", question=f"What is {i} + 7 - {i}?", answer="7",
                        source="t") for i in range(2)]
    cfg = GrpoRunConfig(model=str(folder), url="http://fake", output_dir=str(run_dir),
                        num_generations=4, prompts_per_step=2, max_completion_length=32,
                        max_steps=2, save_steps=0, learning_rate=1e-3, dtype="float32",
                        plot=False, save_final=False, report_to="tensorboard")
    grpo.run_grpo(cfg, problems=problems, log=lambda m: None)

    events = sorted((run_dir / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under <output-dir>/runs"
    tags: dict[str, list[float]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    for name in ("correctness", "skip_ratio", "skip_count", "length"):
        assert f"train/rewards/{name}/mean" in tags, sorted(tags)
    assert tags["train/stepzip/skip_ratio"] == pytest.approx([0.4, 0.4])
    assert tags["train/stepzip/accuracy"] == pytest.approx([0.5, 0.5])
    assert len(tags["train/reward"]) == 2  # one point per optimizer step

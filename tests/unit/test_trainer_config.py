"""Trainer configuration: flags, presets, the nested reward config, the shared training
arguments (no engine, no torch)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from stepzip import config
from stepzip.rewards import RewardConfig
from trainer.config import (
    OBJECTIVES,
    PRESETS,
    TINY,
    BuildSftConfig,
    GrpoRunConfig,
    SftRunConfig,
    TrainingArgs,
    add_flags,
    from_args,
    unescape,
    with_preset,
)


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return parser.parse_args(argv)


def _leaf_fields(cls):
    for f in config.flag_fields(cls):
        inner = config.nested_class(cls, f)
        yield from (_leaf_fields(inner) if inner else [f])


@pytest.mark.parametrize("cls", [BuildSftConfig, SftRunConfig, GrpoRunConfig])
def test_every_field_has_a_flag_and_help(cls) -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    flags = {a.dest for a in parser._actions}
    for f in _leaf_fields(cls):
        assert f.name in flags
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    parser.format_help()  # no stray % in help texts


def test_sft_and_grpo_share_the_training_arguments() -> None:
    shared = {f.name for f in dataclasses.fields(TrainingArgs)}
    for cls in (SftRunConfig, GrpoRunConfig):
        assert issubclass(cls, TrainingArgs)
        assert shared <= {f.name for f in dataclasses.fields(cls)}
    # Cheap disks by default: LoRA, no optimizer state, the last N checkpoints.
    for cfg in (SftRunConfig(), GrpoRunConfig()):
        assert cfg.lora and not cfg.save_optimizer and cfg.save_total_limit


def test_defaults_without_flags() -> None:
    assert from_args(GrpoRunConfig, _parse(GrpoRunConfig, [])) == GrpoRunConfig()
    assert GrpoRunConfig().num_generations == 14  # the paper's K
    assert GrpoRunConfig().reward == RewardConfig()


def test_help_shows_each_subclass_default_once() -> None:
    text = argparse.ArgumentParser()
    add_flags(text, SftRunConfig)
    helps = {a.dest: a.help for a in text._actions}
    assert helps["learning_rate"].endswith("(default: 0.0001)")


def test_flag_beats_preset_beats_default() -> None:
    cfg = from_args(GrpoRunConfig, _parse(GrpoRunConfig, ["--tiny"]))
    assert cfg.num_generations == TINY[GrpoRunConfig]["num_generations"] == 4
    assert cfg.max_steps == 2 and cfg.max_completion_length == 32
    assert cfg.reward.max_completion_tokens == 30  # the preset's nested reward value
    assert cfg.reward.correct_reward == 2.0        # ...on top of the reward's defaults
    cfg = from_args(GrpoRunConfig, _parse(GrpoRunConfig, ["--preset", "tiny", "--max-steps",
                                                          "3", "--max-completion-tokens", "9"]))
    assert cfg.max_steps == 3 and cfg.num_generations == 4
    assert cfg.reward.max_completion_tokens == 9
    demo = from_args(GrpoRunConfig, _parse(GrpoRunConfig, ["--preset", "cpu-demo"]))
    assert demo.dataset == "asdiv" and demo.num_generations == 14


def test_reward_flags_fill_the_nested_reward_config() -> None:
    cfg = from_args(GrpoRunConfig, _parse(GrpoRunConfig, [
        "--no-skip-count", "--no-length", "--backend", "trl-vllm", "--correct-reward", "3"]))
    assert cfg.backend == "trl-vllm"
    assert cfg.reward == RewardConfig(skip_count=False, length=False, correct_reward=3.0)
    assert cfg.reward_config().enabled() == ("correctness", "skip_ratio")
    with pytest.raises(SystemExit):
        _parse(BuildSftConfig, ["--keep", "some"])


@dataclasses.dataclass(frozen=True)
class Inner:
    depth: int = config.option(1, "depth")


@dataclasses.dataclass
class Outer:
    name: str = config.option("a", "name")
    inner: Inner = config.option(default_factory=lambda: Inner(depth=2), help="inner")


def test_nested_configs_are_generic() -> None:
    parser = argparse.ArgumentParser()
    config.add_flags(parser, Outer)
    assert "(default: 2)" in parser.format_help()  # the outer default of the inner field
    assert config.from_args(Outer, parser.parse_args([])) == Outer()
    assert config.from_args(Outer, parser.parse_args(["--depth", "5"])).inner == Inner(5)
    assert config.from_args(Outer, parser.parse_args([]),
                            preset={"inner": {"depth": 7}}).inner == Inner(7)


def test_presets_name_real_fields() -> None:
    for preset in PRESETS.values():
        for cls, values in preset.items():
            names = {f.name for f in dataclasses.fields(cls)}
            assert set(values) <= names, set(values) - names
            with_preset(cls, None, **values)


def test_with_preset_merges_nested_values() -> None:
    cfg = with_preset(GrpoRunConfig, "cpu-demo", reward={"correct_reward": 1.0}, limit=3)
    assert cfg.limit == 3 and cfg.reward.correct_reward == 1.0
    assert cfg.reward.max_completion_tokens == PRESETS["cpu-demo"][GrpoRunConfig][
        "reward"]["max_completion_tokens"]


def test_objectives_set_loss_and_kl_unless_given() -> None:
    from trainer.grpo import objective_settings

    assert objective_settings(GrpoRunConfig()) == OBJECTIVES["paper"]
    assert objective_settings(GrpoRunConfig(objective="trl")) == {"loss_type": "dapo",
                                                                  "beta": 0.0}
    assert objective_settings(GrpoRunConfig(beta=0.0))["beta"] == 0.0
    assert objective_settings(GrpoRunConfig(loss_type="bnpo"))["loss_type"] == "bnpo"


def test_reward_config_defaults_come_from_the_sft_folder_meta() -> None:
    cfg = GrpoRunConfig()
    assert cfg.reward_config() == RewardConfig()
    meta = {"marker": "<skip>", "delimiter": "\n", "think_close": "</t>"}
    rc = cfg.reward_config(meta)
    assert (rc.marker, rc.step_delimiter, rc.think_close) == ("<skip>", "\n", "</t>")
    explicit = dataclasses.replace(cfg, reward=RewardConfig(marker="[S]",
                                                            step_delimiter="\\n\\n\\n"))
    rc = explicit.reward_config(meta)
    assert (rc.marker, rc.step_delimiter, rc.think_close) == ("[S]", "\n\n\n", "</t>")


def test_reward_config_validates() -> None:
    with pytest.raises(ValueError):
        from_args(GrpoRunConfig, _parse(GrpoRunConfig, ["--skip-ratio-mid", "0.9"]))


def test_unescape() -> None:
    assert unescape("\\n") == "\n"
    assert unescape(None) is None


def test_stepzip_cli_has_the_train_stages() -> None:
    from clients.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "grpo", "--tiny", "--url", "http://x:1,http://y:2"])
    assert args.func.__name__ == "cmd_grpo"
    assert from_args(GrpoRunConfig, args).url == "http://x:1,http://y:2"
    args = parser.parse_args(["train", "build-sft", "--keep", "all", "--limit", "5"])
    assert from_args(BuildSftConfig, args).keep == "all"
    args = parser.parse_args(["train", "sft", "--no-lora", "--data", "p.jsonl"])
    assert from_args(SftRunConfig, args).lora is False
    args = parser.parse_args(["train", "pipeline", "--preset", "cpu-demo", "--port", "8123",
                              "--output-dir", "/tmp/x"])
    assert args.func.__name__ == "cmd_pipeline" and args.port == 8123


def test_pipeline_refuses_a_port_in_server_args() -> None:
    from trainer.pipeline import serve_argv

    argv = serve_argv("m", dtype="float32", max_model_len=512, weights_root=None,
                      extra=["--kv-cache-gib=1"])
    assert "--port" not in argv and argv[-1] == "--kv-cache-gib=1"
    with pytest.raises(ValueError, match="--port"):
        serve_argv("m", dtype="float32", max_model_len=512, weights_root=None,
                   extra=["--port=9"])

"""Trainer configuration: flags, the tiny preset, the reward config (no engine, no torch)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from trainer.config import (
    TINY,
    BuildSftConfig,
    GrpoRunConfig,
    SftRunConfig,
    add_flags,
    from_args,
    unescape,
)
from stepzip.rewards import RewardConfig


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return parser.parse_args(argv)


@pytest.mark.parametrize("cls", [BuildSftConfig, SftRunConfig, GrpoRunConfig])
def test_every_field_has_a_flag_and_help(cls) -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        assert f.name in flags
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    parser.format_help()  # no stray % in help texts


def test_defaults_without_flags() -> None:
    assert from_args(GrpoRunConfig, _parse(GrpoRunConfig, [])) == GrpoRunConfig()
    assert GrpoRunConfig().num_generations == 14  # the paper's K


def test_flag_beats_tiny_beats_default() -> None:
    cfg = from_args(GrpoRunConfig, _parse(GrpoRunConfig, ["--tiny"]))
    assert cfg.num_generations == TINY[GrpoRunConfig]["num_generations"] == 4
    assert cfg.max_steps == 2 and cfg.max_completion_length == 32
    cfg = from_args(GrpoRunConfig, _parse(GrpoRunConfig, ["--tiny", "--max-steps", "3"]))
    assert cfg.max_steps == 3 and cfg.num_generations == 4


def test_bool_and_choice_flags() -> None:
    cfg = from_args(GrpoRunConfig, _parse(GrpoRunConfig, [
        "--no-skip-count", "--no-length", "--backend", "trl-vllm", "--correct-reward", "3"]))
    assert cfg.skip_count is False and cfg.length is False and cfg.backend == "trl-vllm"
    assert cfg.reward_config().enabled() == ("correctness", "skip_ratio")
    assert cfg.reward_config().correct_reward == 3.0
    with pytest.raises(SystemExit):
        _parse(BuildSftConfig, ["--keep", "some"])


def test_tiny_presets_name_real_fields() -> None:
    for cls, values in TINY.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(values) <= names
        cls(**values)


def test_reward_config_defaults_come_from_the_sft_folder_meta() -> None:
    cfg = GrpoRunConfig()
    assert cfg.reward_config() == RewardConfig()
    meta = {"marker": "<skip>", "delimiter": "\n", "think_close": "</t>"}
    rc = cfg.reward_config(meta)
    assert (rc.marker, rc.step_delimiter, rc.think_close) == ("<skip>", "\n", "</t>")
    explicit = dataclasses.replace(cfg, marker="[S]", step_delimiter="\\n\\n")
    rc = explicit.reward_config(meta)
    assert (rc.marker, rc.step_delimiter, rc.think_close) == ("[S]", "\n\n", "</t>")


def test_every_reward_threshold_is_a_grpo_flag() -> None:
    grpo = {f.name for f in dataclasses.fields(GrpoRunConfig)}
    assert {f.name for f in dataclasses.fields(RewardConfig)} <= grpo


def test_reward_config_validates() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(GrpoRunConfig(), skip_ratio_mid=0.9).reward_config()


def test_unescape() -> None:
    assert unescape("\\n") == "\n"
    assert unescape(None) is None


def test_stepzip_cli_has_the_train_stages() -> None:
    from clients.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "grpo", "--tiny", "--url", "http://x:1"])
    assert args.func.__name__ == "cmd_grpo" and args.url == "http://x:1"
    args = parser.parse_args(["train", "build-sft", "--keep", "all", "--limit", "5"])
    assert from_args(BuildSftConfig, args).keep == "all"
    args = parser.parse_args(["train", "sft", "--lora", "--data", "p.jsonl"])
    assert from_args(SftRunConfig, args).lora is True
    args = parser.parse_args(["train", "pipeline", "--tiny", "--output-dir", "/tmp/x"])
    assert args.func.__name__ == "cmd_pipeline"

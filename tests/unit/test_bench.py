"""Benchmark plumbing without servers: the tiny overhead-bound model, TRL's request fields,
round alternation and the kernel benchmark's report (never its timings)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
from pathlib import Path

import pytest

from clients import bench


def test_rollout_requests_carry_what_trl_sends():
    """Read from trl's VLLMClient.generate source (importing it pulls in vLLM: slow)."""
    spec = importlib.util.find_spec("trl")
    source = (Path(spec.origin).parent / "generation" / "vllm_client.py").read_text()
    generate = next(node for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.FunctionDef) and node.name == "generate")
    args = generate.args.args[-len(generate.args.defaults):]
    defaults = {a.arg: ast.literal_eval(d) for a, d in zip(args, generate.args.defaults, strict=True)}
    for field in ("repetition_penalty", "temperature", "top_p", "top_k", "min_p"):
        assert bench.TRL_SAMPLING[field] == defaults[field], field
    assert defaults["logprobs"] == 0  # the rollout bench's --logprobs default
    body = ast.get_source_segment(source, generate)
    assert '"return_token_ids": True' in body and '"return_tokens_as_token_ids": True' in body


def test_rollout_rounds_rotate_over_the_three_arms():
    arms = ["stepzip", "plain", "vllm"]
    orders = [bench._rotate(arms, r) for r in range(6)]
    assert all(sorted(o) == sorted(arms) for o in orders)
    assert {o[0] for o in orders[:3]} == set(arms)   # every arm leads once per 3 rounds
    assert {o[-1] for o in orders[:3]} == set(arms)
    assert orders[3] == orders[0][::-1]               # then the order reverses
    assert bench.ROLLOUT_ARMS["plain"] == ("stepzip", {})
    assert bench.ROLLOUT_ARMS["stepzip"][1] == {"stepzip": {"entropies": True}}


def test_rollout_arms_without_vllm_start_one_server():
    from clients.cli import build_parser

    args = build_parser().parse_args(["bench", "rollout", "--model", "tiny", "--arms", "stepzip",
                                      "plain"])
    assert args.arms == ["stepzip", "plain"]
    assert list(bench._rollout_servers("/models/x", args)) == ["stepzip"]
    args = build_parser().parse_args(["bench", "rollout", "--model", "tiny"])
    assert args.arms == ["stepzip", "plain", "vllm"]
    assert list(bench._rollout_servers("/models/x", args)) == ["stepzip", "vllm"]


def test_rounds_alternate_who_goes_first():
    assert bench._alternate(["stepzip", "vllm"], 0) == ["stepzip", "vllm"]
    assert bench._alternate(["stepzip", "vllm"], 1) == ["vllm", "stepzip"]


def test_paired_ratio_compares_within_rounds():
    # Round 2 ran in a slow phase for both: per-round ratios see 1.0 throughout, while the
    # medians taken apart would not.
    paired = bench.paired_ratio([100.0, 50.0, 104.0], [100.0, 50.0, 104.0])
    assert paired["ratio"] == 1.0 and paired["ratio_min"] == paired["ratio_max"] == 1.0
    paired = bench.paired_ratio([90.0, 45.0, 99.0, 30.0], [100.0, 50.0, 90.0, 60.0])
    assert paired["per_round"] == [0.9, 0.9, 1.1, 0.5]
    assert paired["ratio"] == 0.9 and paired["ratio_min"] == 0.5
    assert "median of 4 rounds" in bench.describe(paired)
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0], [1.0, 2.0])


def test_tiny_model_is_built_once_from_the_default_tokenizer(tmp_path, default_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    folder = bench.build_tiny_model(tmp_path / "tiny")
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (2, 128, 64)
    assert config.vocab_size == AutoConfig.from_pretrained(default_model_dir).vocab_size == 49_152
    ours, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(default_model_dir)
    assert ours.get_vocab() == theirs.get_vocab()
    weights = folder / "model.safetensors"
    assert 20e6 < weights.stat().st_size < 40e6
    stamp = weights.stat().st_mtime_ns
    assert bench.build_tiny_model(folder) == folder and weights.stat().st_mtime_ns == stamp
    assert not (tmp_path / "tiny.partial").exists()


def test_kernel_benchmark_reports_ratio_and_accuracy(capsys):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "kernel", "--rows", "4", "--vocab", "3000", "--rounds", "3"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "kernel" and summary["threads"] == 1
    assert set(summary["median_ms"]) == {"log_softmax", "log_softmax_into_buffer", "kernel",
                                         "entropy_torch"}
    assert summary["ratio_kernel_log_softmax"] > 0
    assert summary["max_abs_err_f64"] < 1e-5


@pytest.mark.parametrize("argv", [["--url", "http://a"], ["--logprobs", "x"]])
def test_rollout_flags_are_checked(argv):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "rollout", *argv])


def test_noise_benchmark_reports_spread(capsys):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "noise", "--repeats", "3", "--pause", "0"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "noise" and len(summary["ms"]) == 3
    assert summary["min_ms"] <= summary["median_ms"] <= summary["max_ms"]

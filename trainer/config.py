"""Configuration of the three training stages, and the tiny CPU preset.

Each stage is one dataclass (the shared mechanism of `stepzip.config`); every field is a
`stepzip train <stage>` flag of the same
name (``max_tokens`` -> ``--max-tokens``; booleans get ``--x/--no-x``), and its help
text is the field's ``help`` metadata. A value comes from, in order: the flag, the
``--tiny`` preset (when given), the field default.

The tiny preset is the configuration that runs end to end on a 2-core CPU in minutes on
the embedded SmolLM2-135M: a handful of GSM8K problems, K = 4 completions of 32 tokens,
2 GRPO steps, fp32. It proves the machinery, not learning.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from stepzip import config
from stepzip.config import unescape
from stepzip.constants import MARKER, THINK_CLOSE
from stepzip.rewards import RewardConfig

_f = config.option


@dataclass
class BuildSftConfig:
    """`stepzip train build-sft`: (problem, compressed CoT) pairs from /v1/compress."""

    url: str = _f("http://127.0.0.1:8000", "stepzip server to compress with")
    api_key: str | None = _f(None, "bearer key of the server, when it has one")
    output: str = _f("sft.jsonl", "JSONL of pairs to write (rerun = resume)")
    dataset: str = _f("gsm8k", "gsm8k, math500, svamp or a .jsonl path")
    split: str = _f("train", "dataset split")
    limit: int | None = _f(None, "problems to take (default: all)")
    offset: int = _f(0, "first problem to take")
    batch_size: int = _f(8, "problems per /v1/compress request (<= the server's --max-problems)")
    concurrency: int = _f(2, "requests in flight at once")
    max_tokens: int = _f(512, "reasoning tokens to generate at most")
    temperature: float = _f(0.0, "sampling temperature of the full-CoT trace")
    top_p: float = _f(1.0, "top-p of the full-CoT trace")
    seed: int | None = _f(None, "sampling seed (per problem: seed + sample)")
    samples: int = _f(1, "traces per problem (each may become a pair)")
    ratio: float = _f(0.8, "kappa: fraction of lowest-entropy steps replaced by the marker")
    strategy: Literal["low", "high", "random"] = _f("low", "which steps to prune")
    keep: Literal["correct", "all"] = _f(
        "correct", "keep pairs whose answer from the compressed trace is correct, or all")
    answer_from: Literal["model", "gold"] = _f(
        "model", "answer written after the compressed reasoning: the model's own "
        "(from the compressed trace) or the gold answer")
    answer_max_tokens: int = _f(64, "tokens of the answer from the compressed trace")
    delimiter: str | None = _f(None, "step delimiter, escapes allowed ('\\n'); default: "
                                     "the server's")
    marker: str = _f(MARKER, "marker that replaces a pruned step")
    think_close: str = _f(THINK_CLOSE, "tag that ends the reasoning in the SFT completion")
    prompt_template: str | None = _f(None, "user message template with {problem}")
    system: str | None = _f(None, "system message")
    retries: int = _f(2, "retries of a failed request (transport errors, 5xx)")
    timeout: float = _f(1800.0, "seconds one request may take")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class SftRunConfig:
    """`stepzip train sft`: TRL SFTTrainer on the compressed pairs."""

    model: str = _f("default", "base model: folder, hub id, or 'default' (embedded SmolLM2)")
    data: str = _f("sft.jsonl", "pairs written by build-sft")
    output_dir: str = _f("sft-model", "folder of the trained model (servable by stepzip serve)")
    marker: str = _f(MARKER, "skip marker added to the tokenizer as one token")
    skip_token: Literal["normal", "special"] = _f(
        "normal", "add the marker as a normal token (kept by skip_special_tokens decoding; "
        "the default) or as a special token")
    pad_vocab_multiple: int | None = _f(
        None, "pad the resized embedding to a multiple of this (off by default: padded "
        "rows would be sampleable tokens vLLM cannot detokenize; vLLM pads internally)")
    max_steps: int = _f(-1, "optimizer steps (-1: run --epochs)")
    epochs: float = _f(1.0, "epochs when --max-steps is -1")
    learning_rate: float = _f(1e-5, "peak learning rate")
    warmup_steps: int = _f(0, "linear warm-up steps")
    batch_size: int = _f(4, "sequences per device per micro-step")
    grad_accum: int = _f(4, "micro-steps per optimizer step")
    max_length: int = _f(2048, "tokens per sequence (prompt + completion) at most")
    limit: int | None = _f(None, "use only the first N pairs")
    lora: bool = _f(False, "train a LoRA adapter (merged into the saved model)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target: str = _f("all-linear", "LoRA target modules (comma list or all-linear)")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "training dtype; auto: bf16 on a bf16-capable GPU, else fp32")
    save_dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "dtype of the saved model; auto: the training dtype")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    seed: int = _f(0, "seed")
    logging_steps: int = _f(10, "log every N steps")
    save_steps: int = _f(0, "checkpoint every N steps (0: only the final model)")
    resume: str | None = _f(None, "resume from a checkpoint folder, or 'latest'")


@dataclass
class GrpoRunConfig:
    """`stepzip train grpo`: TRL GRPOTrainer, completions from the stepzip server."""

    model: str = _f("sft-model", "policy to start from: the SFT folder the server serves")
    url: str = _f("http://127.0.0.1:8000", "stepzip server (started on --model with "
                                           "--enable-weight-routes --weights-root <output-dir>)")
    api_key: str | None = _f(None, "bearer key of the server, when it has one")
    output_dir: str = _f("grpo-run", "run folder: checkpoints, weight syncs, metrics, plot")
    backend: Literal["http", "trl-vllm"] = _f(
        "http", "http: rollout_func over /v1/completions, weights reloaded from a "
        "checkpoint folder after each step (CPU or GPU); trl-vllm: TRL's own vLLM server "
        "mode with NCCL weight sync (GPU only)")
    dataset: str = _f("gsm8k", "gsm8k, math500, svamp or a .jsonl path")
    split: str = _f("train", "dataset split")
    limit: int | None = _f(None, "problems to use (default: all)")
    offset: int = _f(0, "first problem to use")
    num_generations: int = _f(14, "K: completions per prompt (the paper's 14)")
    prompts_per_step: int = _f(4, "prompts per optimizer step (x K completions)")
    grad_accum: int = _f(1, "micro-steps per optimizer step (divides prompts x K)")
    max_completion_length: int = _f(4096, "tokens per completion at most")
    temperature: float = _f(1.0, "rollout temperature")
    top_p: float = _f(1.0, "rollout top-p")
    top_k: int = _f(-1, "rollout top-k (-1: off)")
    min_p: float | None = _f(None, "rollout min-p")
    repetition_penalty: float = _f(1.0, "rollout repetition penalty")
    learning_rate: float = _f(1e-6, "peak learning rate")
    beta: float = _f(0.0, "KL coefficient (0: no reference model)")
    epsilon: float = _f(0.2, "clipping epsilon")
    loss_type: str | None = _f(None, "TRL loss_type (default: TRL's)")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "advantage scaling")
    max_steps: int = _f(100, "optimizer steps in total (a resumed run counts on)")
    save_steps: int = _f(10, "checkpoint every N steps")
    save_total_limit: int | None = _f(3, "checkpoints kept")
    resume: str | None = _f(None, "resume from a checkpoint folder, or 'latest'")
    sync_weights: bool = _f(True, "push the policy to the server after every optimizer step")
    sync_dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "dtype of the pushed weights; auto: the training dtype (bf16 would round "
        "away small updates of an fp32 policy; for the same reason serve it with --dtype "
        "float32 when training in fp32)")
    keep_syncs: int = _f(2, "weight-sync folders kept in <output-dir>/sync")
    sync_checksum: bool = _f(True, "ask the server for a checksum of what it loaded")
    request_prompts: int = _f(8, "prompts per /v1/completions request")
    concurrency: int = _f(2, "rollout requests in flight")
    timeout: float = _f(1800.0, "seconds one HTTP request may take")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "training dtype; auto: bf16 on a bf16-capable GPU, else fp32")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    lora: bool = _f(False, "train a LoRA adapter (merged weights are pushed)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_target: str = _f("all-linear", "LoRA target modules")
    seed: int = _f(0, "seed")
    logging_steps: int = _f(1, "log every N steps")
    log_completions: bool = _f(False, "TRL's completion tables")
    save_final: bool = _f(True, "save the final policy (with tokenizer) to <output-dir>/final")
    plot: bool = _f(True, "draw <output-dir>/rewards.png at the end")
    # Reward (stepzip.rewards.RewardConfig): None = from the SFT folder's
    # stepzip_train.json, else RewardConfig's default.
    correctness: bool = _f(True, "reward: correctness component on")
    correct_reward: float = _f(2.0, "reward for a correct answer after </think>")
    skip_ratio: bool = _f(True, "reward: skip-ratio component on")
    skip_ratio_high: float = _f(0.8, "skip ratio of the high tier")
    skip_ratio_high_reward: float = _f(1.0, "reward of the high tier")
    skip_ratio_mid: float = _f(0.5, "skip ratio of the middle tier")
    skip_ratio_mid_reward: float = _f(0.5, "reward of the middle tier")
    skip_count: bool = _f(True, "reward: skip-count component on")
    max_skips: int = _f(100, "markers allowed before the penalty")
    too_many_skips_penalty: float = _f(-2.0, "penalty for more than --max-skips markers")
    length: bool = _f(True, "reward: length component on")
    max_completion_tokens: int = _f(3500, "tokens allowed before the length penalty")
    too_long_penalty: float = _f(-1.0, "penalty for a longer completion")
    marker: str | None = _f(None, "skip marker (default: the SFT folder's, else [SKIP])")
    think_close: str | None = _f(None, "reasoning end tag (default: the SFT folder's, "
                                       "else </think>)")
    step_delimiter: str | None = _f(None, "step delimiter of the reward, escapes allowed "
                                          "(default: the SFT folder's, else \\n\\n)")

    def reward_config(self, defaults: dict[str, Any] | None = None) -> RewardConfig:
        """The RewardConfig; unset marker/think_close/delimiter come from `defaults`
        (the SFT folder's stepzip_train.json) and then RewardConfig's own."""
        defaults = defaults or {}
        names = {f.name for f in dataclasses.fields(RewardConfig)}
        values = {n: getattr(self, n) for n in names if hasattr(self, n)}
        for name, meta_key in (("marker", "marker"), ("think_close", "think_close"),
                               ("step_delimiter", "delimiter")):
            if values.get(name) is None:
                values.pop(name, None)
                if defaults.get(meta_key):
                    values[name] = defaults[meta_key]
        if "step_delimiter" in values:
            values["step_delimiter"] = unescape(values["step_delimiter"])
        return RewardConfig(**values)


# The configuration that runs on a 2-core CPU in minutes (see the module docstring).
TINY: dict[type, dict[str, Any]] = {
    BuildSftConfig: {"limit": 4, "batch_size": 4, "concurrency": 1, "max_tokens": 64,
                     "keep": "all", "answer_max_tokens": 16, "progress": False},
    SftRunConfig: {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 384,
                   "learning_rate": 1e-4, "logging_steps": 1, "dtype": "float32"},
    GrpoRunConfig: {"limit": 4, "num_generations": 4, "prompts_per_step": 1, "grad_accum": 1,
                    "max_completion_length": 32, "max_steps": 2, "save_steps": 1,
                    "save_total_limit": 1, "learning_rate": 1e-6, "dtype": "float32",
                    "max_completion_tokens": 30, "keep_syncs": 1, "request_prompts": 2,
                    "concurrency": 1},
}


# ---- flags: the shared mechanism (stepzip.config) plus the --tiny preset ------------------


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """The stage's flags, plus --tiny."""
    config.add_flags(parser, cls)
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny CPU preset (explicit flags still win)")


def from_args(cls: type, args: argparse.Namespace, tiny: bool | None = None) -> Any:
    """Flag > tiny preset > field default."""
    tiny = getattr(args, "tiny", False) if tiny is None else tiny
    return config.from_args(cls, args, preset=TINY.get(cls, {}) if tiny else None)

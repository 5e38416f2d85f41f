"""Stage 3: GRPO with the paper's four-part reward, rollouts from the stepzip server.

Two backends:

* ``http`` (CPU or GPU): TRL's ``rollout_func`` (trainer/rollout.py) asks
  ``POST /v1/completions`` for K completions of each prompt (token-id prompts,
  ``return_token_ids``, sampled-token logprobs, the ``stepzip`` skip statistics). After
  every optimizer step ``WeightSyncCallback`` (trainer/callbacks.py) writes the policy
  as a safetensors folder under ``<output-dir>/sync/`` and ``POST /v1/weights/load``s
  it, so the next rollouts come from the new weights. The server must run on the SFT
  folder with ``--enable-weight-routes --weights-root <output-dir>`` (its vocabulary,
  [SKIP] included, cannot grow at reload).
* ``trl-vllm`` (GPU only): TRL's own ``use_vllm=True, vllm_mode="server"`` against the
  same server, which exposes TRL's NCCL weight-sync routes.

Rewards (trainer/rewards.py): one TRL reward function per enabled component, so TRL
logs ``rewards/<component>/mean`` and sums them into the paper's reward.

Output: ``metrics.jsonl`` (TRL's logs + timings + weight version per step) and
``grpo.png`` (trainer/metrics.py); checkpoints ``checkpoint-N`` (the LoRA adapter, or
the model, without optimizer state unless ``--save-optimizer``; the last
``--save-total-limit`` kept); ``final/``: the last pushed weights moved into place with
the tokenizer, not another copy. ``--resume latest`` continues from the last checkpoint
and first pushes its weights to the server; without optimizer state Adam's moments and
the LR schedule restart there (the weights, step count and data order continue).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clients.client import StepzipClient
from stepzip.rewards import RewardConfig, skip_token_id_of
from trainer.callbacks import (
    MetricsCallback,
    StepClockCallback,
    VersionProbeCallback,
    WeightSyncCallback,
    safe_call,
)
from trainer.common import (
    CheckpointHygieneCallback,
    lora_config,
    make_readable,
    model_card,
    resume_checkpoint,
    set_threads,
    trainer_kwargs,
)
from trainer.config import OBJECTIVES, GrpoRunConfig
from trainer.metrics import METRICS_FILE, read_metrics
from trainer.rewards import make_reward_funcs
from trainer.rollout import ServerRollout, StepTimes


def grpo_dataset_rows(problems: Sequence[Any], tokenizer: Any,
                      template: str | None = None, system: str | None = None) -> list[dict]:
    """Rows {prompt, answer, id}: the prompt rendered as the server renders it for
    /v1/compress (chat template, a <think> opener for a thinking model)."""
    from stepzip.prompts import style_for

    style = style_for(tokenizer)
    return [{"prompt": style.reasoning_prompt(tokenizer, p.question, template, system),
             "answer": p.answer, "id": p.id} for p in problems]


def objective_settings(cfg: GrpoRunConfig) -> dict[str, Any]:
    """loss_type and beta: the flags when given, else the objective's."""
    preset = OBJECTIVES[cfg.objective]
    return {"loss_type": cfg.loss_type or preset["loss_type"],
            "beta": preset["beta"] if cfg.beta is None else cfg.beta}


def grpo_args(cfg: GrpoRunConfig, dtype: Any, cpu: bool) -> Any:
    """The GRPOConfig for a run config."""
    from trl import GRPOConfig

    per_step = cfg.prompts_per_step * cfg.num_generations
    if per_step % cfg.grad_accum:
        raise ValueError(f"prompts_per_step x num_generations ({per_step}) must be divisible "
                         f"by grad_accum ({cfg.grad_accum})")
    kw: dict[str, Any] = dict(
        **trainer_kwargs(cfg, cfg.output_dir, dtype, cpu),
        **objective_settings(cfg),
        num_generations=cfg.num_generations,
        per_device_train_batch_size=per_step // cfg.grad_accum,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=max(0, cfg.top_k),
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        epsilon=cfg.epsilon,
        scale_rewards=cfg.scale_rewards,
        log_completions=cfg.log_completions,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    if cfg.backend == "trl-vllm":
        if cpu:
            raise ValueError("backend trl-vllm needs a GPU (NCCL weight sync); use http")
        kw.update(use_vllm=True, vllm_mode="server", vllm_server_base_url=cfg.url)
    return GRPOConfig(**kw)


def build_trainer(cfg: GrpoRunConfig, model: Any, tokenizer: Any, dataset: Any,
                  reward: RewardConfig, *, rollout: Any = None,
                  callbacks: Sequence[Any] = ()) -> Any:
    """The GRPOTrainer a run trains with: the objective, LoRA, the reward functions.
    Without `rollout` TRL generates with the policy itself (what the learning test does)."""
    from trl import GRPOTrainer

    from trainer.modeling import on_cpu, pick_dtype

    card = model_card(stage="grpo", base_model=str(cfg.model), lines=[
        f"objective {cfg.objective} ({objective_settings(cfg)}), K={cfg.num_generations}",
        f"reward: {', '.join(reward.enabled())}"])
    return GRPOTrainer(
        model=model,
        reward_funcs=make_reward_funcs(reward, tokenizer),
        args=grpo_args(cfg, pick_dtype(cfg.dtype), on_cpu()),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[*callbacks, CheckpointHygieneCallback(card)],
        peft_config=lora_config(cfg),
        rollout_func=rollout,
    )


def run_grpo(cfg: GrpoRunConfig, *, problems: Sequence[Any] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train; returns a summary (also written to <output-dir>/grpo_summary.json)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepzip.data import load_problems
    from trainer.modeling import pick_dtype, read_meta, resolve_model

    started = time.perf_counter()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    set_threads(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model)
    meta = read_meta(model_path)
    reward_cfg = cfg.reward_config(meta)
    dtype = pick_dtype(cfg.dtype)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    skip_id = skip_token_id_of(tokenizer, reward_cfg.marker)
    if problems is None:
        problems = load_problems(cfg.dataset, cfg.split, limit=cfg.limit, offset=cfg.offset,
                                 **cfg.fields())
    dataset = Dataset.from_list(grpo_dataset_rows(problems, tokenizer, cfg.prompt_template,
                                                  cfg.system))
    log(f"grpo: {len(dataset)} prompts, K={cfg.num_generations}, {cfg.prompts_per_step} "
        f"prompts/step, {cfg.max_steps} steps, objective {cfg.objective} "
        f"{objective_settings(cfg)}, {f'LoRA r={cfg.lora_r}' if cfg.lora else 'full'}, "
        f"backend {cfg.backend}, policy {model_path}, dtype {dtype}; marker "
        f"{reward_cfg.marker!r} (id {skip_id}), delimiter {reward_cfg.step_delimiter!r}; "
        f"reward {', '.join(reward_cfg.enabled())}")

    client = StepzipClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout)
    log(f"grpo: waiting for the server at {cfg.url}")
    client.wait_ready(timeout=cfg.timeout)
    version_start = client.weight_version()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    served_vocab = model.get_input_embeddings().weight.shape[0]
    if skip_id is not None and skip_id >= served_vocab:
        raise ValueError(f"marker id {skip_id} is outside the model's {served_vocab} rows")

    times = StepTimes()
    callbacks: list[Any] = [StepClockCallback(times)]
    sync = rollout = None
    if cfg.backend == "http":
        rollout = ServerRollout(client, tokenizer, cfg, reward_cfg, times)
        if cfg.sync_weights:
            sync_dtype = dtype if cfg.sync_dtype == "auto" else pick_dtype(cfg.sync_dtype)
            sync = WeightSyncCallback(client, run_dir, times, dtype=sync_dtype,
                                      checksum=cfg.sync_checksum, log=log)
            callbacks.append(sync)
    else:
        callbacks.append(VersionProbeCallback(client, times))
    callbacks.append(MetricsCallback(run_dir, times, plot=cfg.plot, log=log))
    trainer = build_trainer(cfg, model, tokenizer, dataset, reward_cfg, rollout=rollout,
                            callbacks=callbacks)

    resume = resume_checkpoint(cfg.resume, run_dir, log)
    if not resume:  # a fresh run's metrics must not merge with an earlier run's
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    first_step = 0
    if resume:
        state_file = Path(resume) / "trainer_state.json"
        if state_file.is_file():
            first_step = json.loads(state_file.read_text()).get("global_step", 0)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume or None)
    train_s = time.perf_counter() - t0

    final_dir = None
    if cfg.save_final:
        final_dir = save_final(trainer, run_dir, sync, tokenizer, dtype, meta={
            **meta, "stage": "grpo", "grpo_steps": trainer.state.global_step,
            "marker": reward_cfg.marker, "delimiter": reward_cfg.step_delimiter,
            "think_close": reward_cfg.think_close, "skip_token_id": skip_id})
    records = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else []
    this_run = [r for r in records if r["step"] > first_step]
    summary = {
        "stage": "grpo",
        "backend": cfg.backend,
        "model": model_path,
        "resumed_from": str(resume) if resume else None,
        "first_step": first_step,
        "global_step": trainer.state.global_step,
        "train_loss": getattr(result, "training_loss", None),
        "weight_version_start": version_start,
        "weight_version_end": safe_call(client.weight_version),
        "syncs": sync.history if sync else [],
        "train_seconds": train_s,
        "seconds": time.perf_counter() - started,
        "time_split": time_split(this_run),
        "first_and_last": first_and_last(this_run),
        "reward": dataclasses.asdict(reward_cfg),
        "final_dir": str(final_dir) if final_dir else None,
        "config": dataclasses.asdict(cfg),
    }
    (run_dir / "grpo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    client.close()
    split = summary["time_split"]
    log(f"grpo: steps {first_step} -> {trainer.state.global_step} in {train_s:.1f} s "
        f"(rollouts {split['rollout_s']:.1f} s, update {split['update_s']:.1f} s, weight sync "
        f"{split['sync_s']:.1f} s, checkpoints {split['checkpoint_s']:.1f} s); server weights "
        f"{version_start} -> {summary['weight_version_end']}; metrics {run_dir / METRICS_FILE}")
    return summary


def save_final(trainer: Any, run_dir: Path, sync: WeightSyncCallback | None, tokenizer: Any,
               dtype: Any, meta: dict[str, Any]) -> Path:
    """<run>/final: the folder the server was last pushed (moved, not copied) when it holds
    the final weights, else an export; plus tokenizer, model card and stepzip_train.json."""
    from trainer.modeling import META_FILE, export_policy

    final_dir = run_dir / "final"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    latest = sync.latest if sync else None
    if latest is not None and sync.history[-1]["step"] == trainer.state.global_step \
            and latest.is_dir():
        os.replace(latest, final_dir)
    else:
        export_policy(trainer.model, final_dir, dtype=dtype)
    tokenizer.save_pretrained(final_dir)
    (final_dir / "README.md").write_text(model_card(stage="grpo", base_model=str(
        meta.get("base_model", "?")), lines=[f"GRPO steps: {meta['grpo_steps']}"]))
    (final_dir / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    make_readable(final_dir)
    return final_dir


def first_and_last(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Reward, skip ratio, tokens and accuracy at the first and last logged step."""
    keys = ("reward", "stepzip/skip_ratio", "completions/mean_length", "stepzip/accuracy",
            "stepzip/closed_reasoning")
    logged = [r for r in records if "reward" in r]
    if not logged:
        return {}
    return {name: {"step": r["step"], **{k: r.get(k) for k in keys}}
            for name, r in (("first", logged[0]), ("last", logged[-1]))}


def time_split(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds spent on rollouts, on the rest of each step (scoring, logprobs, backward,
    optimizer: "update") and on weight syncs, summed over the records."""
    total = {"rollout_s": 0.0, "update_s": 0.0, "sync_s": 0.0, "step_s": 0.0,
             "sync_save_s": 0.0, "sync_load_s": 0.0, "checkpoint_s": 0.0}
    for r in records:
        t = {**(r.get("timing") or {}), "checkpoint_s": r.get("checkpoint_s")}
        for key in total:
            value = t.get(key)
            if isinstance(value, (int, float)):
                total[key] += value
    return total

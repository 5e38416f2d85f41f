"""Stage 3: GRPO with the paper's four-part reward, rollouts from the stepzip server.

Two backends:

* ``http`` (CPU or GPU): TRL's ``rollout_func`` asks ``POST /v1/completions`` for K
  completions of each prompt (token-id prompts, ``return_token_ids``, sampled-token
  logprobs, the ``stepzip`` skip statistics). After every optimizer step
  ``WeightSyncCallback`` writes the policy as a safetensors folder under
  ``<output-dir>/sync/`` and ``POST /v1/weights/load``s it, so the next rollouts come
  from the new weights; the server's weight version is recorded per step. The server
  must run on the SFT folder with ``--enable-weight-routes --weights-root <output-dir>``
  (its vocabulary, [SKIP] included, cannot grow at reload).
* ``trl-vllm`` (GPU only): TRL's own ``use_vllm=True, vllm_mode="server"`` against the
  same server, which exposes TRL's NCCL weight-sync routes; TRL pushes the weights before
  each generation.

Rewards: one TRL reward function per enabled component (stepzip.rewards), so TRL logs
``rewards/<component>/mean`` and sums them into the paper's reward. The first of them
also logs diagnostics through TRL's ``log_metric``: skip ratio, skips and steps per
completion, accuracy (graded whether or not correctness is rewarded), and the share of
completions that closed their reasoning.

Per step, ``<output-dir>/metrics.jsonl`` gets TRL's logs plus the wall time of the step,
of the rollouts in it, of the weight sync, and the server's weight version before and
after; ``rewards.png`` plots the components at the end. Checkpoints are TRL's
(``checkpoint-N``, with optimizer state); ``--resume latest`` continues from the last one
and first pushes its weights to the server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.client import StepzipClient
from trainer.config import GrpoRunConfig
from stepzip.rewards import (
    RewardConfig,
    completion_text,
    count_skips,
    count_steps,
    make_trl_reward_funcs,
    skip_ratio,
    skip_token_id_of,
    split_completion,
)

try:  # transformers is in the train extra; keep the pure parts importable without it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "rewards.png"
SYNC_DIR = "sync"



# ---- timings shared by the rollout function and the callbacks ------------------------------


@dataclass
class StepTimes:
    """What one optimizer step spent, filled by the rollout function and the callbacks."""

    rollout_s: float = 0.0
    rollout_requests: int = 0
    rollout_completion_tokens: int = 0
    server_skip_ratio: list[float] = field(default_factory=list)
    step_s: float | None = None
    sync_s: float | None = None
    sync_save_s: float | None = None
    sync_load_s: float | None = None
    sync_server_s: float | None = None
    version_before: str | None = None
    version_after: str | None = None
    checksum: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("lock", "server_skip_ratio")}
        if self.server_skip_ratio:
            out["server_skip_ratio"] = sum(self.server_skip_ratio) / len(self.server_skip_ratio)
        return out

    def reset(self) -> None:
        fresh = StepTimes()
        for f in dataclasses.fields(self):
            if f.name != "lock":
                setattr(self, f.name, getattr(fresh, f.name))


# ---- rollouts ------------------------------------------------------------------------------


def group_prompts(prompts: Sequence[Any], k: int) -> tuple[list[Any], int]:
    """(distinct prompts, n): TRL hands the rollout function each prompt repeated K times
    in a row (its RepeatSampler); ask once with n=K then. Anything else is asked as is."""
    if k > 1 and len(prompts) % k == 0 and all(
            prompts[i] == prompts[i - i % k] for i in range(len(prompts))):
        return list(prompts[::k]), k
    return list(prompts), 1


class ServerRollout:
    """TRL ``rollout_func``: completions from ``/v1/completions`` of the stepzip server.

    Returns ``prompt_ids``, ``completion_ids``, ``logprobs`` (the sampled tokens', from
    the engine) and, for the reward functions, ``server_skip_ratio``, ``server_n_skips``,
    ``server_n_steps`` and ``finish_reason`` per completion.
    """

    def __init__(self, client: StepzipClient, tokenizer: Any, cfg: GrpoRunConfig,
                 reward: RewardConfig, times: StepTimes, model_name: str | None = None):
        self.client, self.tokenizer, self.cfg = client, tokenizer, cfg
        self.reward, self.times, self.model_name = reward, times, model_name
        self.calls = 0

    def encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.apply_chat_template(prompt, tokenize=True,
                                                      add_generation_prompt=True,
                                                      return_dict=False)
        if isinstance(prompt, list):  # token ids already
            return [int(t) for t in prompt]
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def body(self, prompt_ids: list[list[int]], n: int, max_tokens: int) -> dict:
        cfg = self.cfg
        body: dict[str, Any] = {
            "prompt": prompt_ids, "n": n, "max_tokens": max_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
            "repetition_penalty": cfg.repetition_penalty, "logprobs": 0,
            "return_token_ids": True, "stream": False,
            "stepzip": {"entropies": False, "steps": False,
                        "delimiter": self.reward.step_delimiter, "marker": self.reward.marker},
        }
        if cfg.min_p is not None:
            body["min_p"] = cfg.min_p
        if self.model_name:
            body["model"] = self.model_name
        return body

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        started = time.perf_counter()
        training = getattr(getattr(trainer, "model", None), "training", True)
        k = trainer.num_generations if training else trainer.num_generations_eval
        max_tokens = getattr(trainer, "max_completion_length", None) or \
            self.cfg.max_completion_length
        distinct, n = group_prompts(prompts, k)
        ids = [self.encode(p) for p in distinct]
        chunk = max(1, self.cfg.request_prompts)
        chunks = [list(range(i, min(i + chunk, len(ids)))) for i in range(0, len(ids), chunk)]

        def ask(indices: list[int]) -> list[dict]:
            response = self.client.completions(self.body([ids[i] for i in indices], n,
                                                         max_tokens))
            choices = sorted(response["choices"], key=lambda c: c["index"])
            if len(choices) != len(indices) * n:
                raise RuntimeError(f"server returned {len(choices)} choices for "
                                   f"{len(indices)} prompts x n={n}")
            return choices

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            answers = list(pool.map(ask, chunks))
        choices = [c for part in answers for c in part]

        eos = self.tokenizer.eos_token_id
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [],
                                "server_skip_ratio": [], "server_n_skips": [],
                                "server_n_steps": [], "finish_reason": []}
        have_logprobs = True
        for j, choice in enumerate(choices):
            p = j // n
            completion = list(choice.get("token_ids") or [])
            lps = (choice.get("logprobs") or {}).get("token_logprobs")
            if not completion:  # TRL reads ids[-1]; an empty completion ended at once
                completion, lps = [eos], [None]
            if lps is None or len(lps) != len(completion):
                have_logprobs = False
            stepzip = choice.get("stepzip") or {}
            out["prompt_ids"].append(ids[p])
            out["completion_ids"].append(completion)
            out["logprobs"].append(lps)
            out["server_skip_ratio"].append(float(stepzip.get("skip_ratio", 0.0)))
            out["server_n_skips"].append(int(stepzip.get("n_skips", 0)))
            out["server_n_steps"].append(int(stepzip.get("n_steps", 0)))
            out["finish_reason"].append(choice.get("finish_reason"))
        if not have_logprobs:
            out["logprobs"] = None  # type: ignore[assignment]
        elapsed = time.perf_counter() - started
        with self.times.lock:
            self.times.rollout_s += elapsed
            self.times.rollout_requests += len(chunks)
            self.times.rollout_completion_tokens += sum(len(c) for c in out["completion_ids"])
            self.times.server_skip_ratio.extend(out["server_skip_ratio"])
        self.calls += 1
        return out


# ---- rewards with diagnostics ----------------------------------------------------------------


def completion_diagnostics(completions: Sequence[Any], completion_ids: Sequence[Any] | None,
                           golds: Sequence[str | None] | None, cfg: RewardConfig,
                           skip_id: int | None) -> dict[str, float]:
    """Means over a batch: skip ratio, skips, steps, accuracy, closed reasoning."""
    from stepzip.grading import grade

    ids = completion_ids if completion_ids is not None else [None] * len(completions)
    golds = golds if golds is not None else [None] * len(completions)
    ratios, skips, steps, correct, closed = [], [], [], [], []
    for c, i, gold in zip(completions, ids, golds, strict=True):
        text = completion_text(c)
        n_skips = count_skips(text, i, skip_id, cfg.marker)
        reasoning, answer = split_completion(text, cfg.think_close)
        ratios.append(skip_ratio(reasoning, n_skips, cfg.step_delimiter, cfg.marker))
        skips.append(n_skips)
        steps.append(count_steps(reasoning.replace(cfg.marker, ""), cfg.step_delimiter)
                     + n_skips)
        closed.append(answer is not None)
        correct.append(bool(answer is not None and gold is not None and grade(answer, gold)[1]))
    n = max(1, len(completions))
    return {"stepzip/skip_ratio": sum(ratios) / n, "stepzip/skips": sum(skips) / n,
            "stepzip/steps": sum(steps) / n, "stepzip/accuracy": sum(correct) / n,
            "stepzip/closed_reasoning": sum(closed) / n}


def make_reward_funcs(cfg: RewardConfig, tokenizer: Any = None) -> list[Callable[..., list]]:
    """stepzip.rewards' component functions; the first also logs the diagnostics."""
    funcs = make_trl_reward_funcs(cfg, tokenizer)
    if not funcs:
        raise ValueError("every reward component is switched off; GRPO needs a reward")
    skip_id = skip_token_id_of(tokenizer, cfg.marker)
    first = funcs[0]

    def with_diagnostics(prompts, completions, completion_ids=None, **kwargs):
        rewards = first(prompts, completions, completion_ids=completion_ids, **kwargs)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for name, value in completion_diagnostics(
                    completions, completion_ids, kwargs.get("answer"), cfg, skip_id).items():
                log_metric(name, value)
            server_ratio = kwargs.get("server_skip_ratio")
            if server_ratio:
                log_metric("stepzip/server_skip_ratio", sum(server_ratio) / len(server_ratio))
        return rewards

    with_diagnostics.__name__ = with_diagnostics.__qualname__ = first.__name__
    return [with_diagnostics, *funcs[1:]]


# ---- callbacks -------------------------------------------------------------------------------


class StepClockCallback(TrainerCallback):
    """Wall time of each optimizer step (rollouts + scoring + update, not the sync)."""

    def __init__(self, times: StepTimes):
        self.times = times
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.times.step_s = time.perf_counter() - self._t0


class WeightSyncCallback(TrainerCallback):
    """After each optimizer step: write the policy under <output-dir>/sync/step-N and
    have the server load it (before the next rollouts). On a resumed run the restored
    weights are pushed first."""

    def __init__(self, client: StepzipClient, run_dir: Path, times: StepTimes, *,
                 dtype: Any = None, keep: int = 2, checksum: bool = True,
                 log: Callable[[str], None] = print):
        self.client, self.run_dir, self.times = client, Path(run_dir), times
        self.dtype, self.keep, self.checksum, self.log = dtype, max(1, keep), checksum, log
        self.history: list[dict[str, Any]] = []

    def push(self, model: Any, step: int) -> dict[str, Any]:
        from trainer.modeling import export_policy

        folder = self.run_dir / SYNC_DIR / f"step-{step:06d}"
        before = self.client.weight_version()
        t0 = time.perf_counter()
        export_policy(model, folder, dtype=self.dtype)
        t1 = time.perf_counter()
        answer = self.client.load_weights(folder, checksum=self.checksum)
        t2 = time.perf_counter()
        record = {"step": step, "path": str(folder), "version_before": before,
                  "version_after": answer.get("version"), "checksum": answer.get("checksum"),
                  "save_s": t1 - t0, "load_s": t2 - t1, "server_s": answer.get("seconds"),
                  "sync_s": t2 - t0}
        self.history.append(record)
        self._prune()
        return record

    def _prune(self) -> None:
        folders = sorted((self.run_dir / SYNC_DIR).glob("step-*"))
        for old in folders[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 and model is not None:
            record = self.push(model, state.global_step)
            self.log(f"grpo: resumed at step {state.global_step}; server now on "
                     f"{record['version_after']} ({record['sync_s']:.1f} s)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        record = self.push(model, state.global_step)
        t = self.times
        t.sync_s, t.sync_save_s, t.sync_load_s = record["sync_s"], record["save_s"], \
            record["load_s"]
        t.sync_server_s = record["server_s"]
        t.version_before, t.version_after = record["version_before"], record["version_after"]
        t.checksum = record["checksum"]


class VersionProbeCallback(TrainerCallback):
    """trl-vllm backend: TRL syncs before each generation; record the server's version."""

    def __init__(self, client: StepzipClient, times: StepTimes):
        self.client, self.times = client, times

    def on_step_begin(self, args, state, control, **kwargs):
        self.times.version_before = _safe(self.client.weight_version)

    def on_step_end(self, args, state, control, **kwargs):
        self.times.version_after = _safe(self.client.weight_version)


class MetricsCallback(TrainerCallback):
    """One JSON line per logged step: TRL's logs + the step's timings + weight version;
    the plot at the end."""

    def __init__(self, run_dir: Path, times: StepTimes, plot: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.times, self.plot = times, plot
        self._logged_at: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:
            return
        record = {"step": state.global_step, "time": time.time(),
                  **{k: _jsonable(v) for k, v in logs.items()}}
        snap = self.times.snapshot()
        if snap.get("step_s") is not None:
            snap["update_s"] = max(0.0, snap["step_s"] - snap["rollout_s"])
        record["timing"] = snap
        record["weight_version"] = snap.get("version_after")
        self._append(record)
        self.times.reset()
        self._logged_at = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        # TRL saves right after logging the step: the gap is the checkpoint's cost.
        if self._logged_at is not None:
            self._append({"step": state.global_step,
                          "checkpoint_s": time.perf_counter() - self._logged_at})
            self._logged_at = None

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot and self.path.exists():
            try:
                plot_metrics(self.path, self.path.with_name(PLOT_FILE))
            except Exception as exc:  # noqa: BLE001 - a plot must never fail a run
                print(f"grpo: plot failed: {type(exc).__name__}: {exc}")


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a probe for the logs only
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as one record per step: a step's lines merged in order, so a
    repeated step (a run resumed from an earlier checkpoint) keeps its latest values."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(metrics_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [r for r in read_metrics(metrics_path) if "timing" in r]
    steps = [r["step"] for r in records]
    keys = sorted({k for r in records for k in r if k.startswith("rewards/")
                   and k.endswith("/mean")})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in keys:
        ax1.plot(steps, [r.get(key) for r in records], marker="o",
                 label=key.removeprefix("rewards/").removesuffix("/mean"))
    if any("reward" in r for r in records):
        ax1.plot(steps, [r.get("reward") for r in records], marker="s", color="black",
                 label="total")
    ax1.set_xlabel("step")
    ax1.set_ylabel("mean reward")
    ax1.set_title("reward components")
    ax1.legend(fontsize=8)
    for key, label in (("stepzip/skip_ratio", "skip ratio"), ("stepzip/accuracy", "accuracy")):
        ax2.plot(steps, [r.get(key) for r in records], marker="o", label=label)
    ax2.set_xlabel("step")
    ax2.set_title("skip ratio / accuracy")
    ax2.set_ylim(-0.05, 1.05)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ---- dataset ---------------------------------------------------------------------------------


def grpo_dataset_rows(problems: Sequence[Any], tokenizer: Any,
                      template: str | None = None, system: str | None = None) -> list[dict]:
    """Rows {prompt, answer, id}: the prompt rendered as the server renders it for
    /v1/compress (chat template, a <think> opener for a thinking model)."""
    from stepzip.prompts import style_for

    style = style_for(tokenizer)
    return [{"prompt": style.reasoning_prompt(tokenizer, p.question, template, system),
             "answer": p.answer, "id": p.id} for p in problems]


# ---- the run ---------------------------------------------------------------------------------


def grpo_args(cfg: GrpoRunConfig, dtype: Any, cpu: bool) -> Any:
    """The GRPOConfig for a run config."""
    import torch
    from trl import GRPOConfig

    per_step = cfg.prompts_per_step * cfg.num_generations
    if per_step % cfg.grad_accum:
        raise ValueError(f"prompts_per_step x num_generations ({per_step}) must be divisible "
                         f"by grad_accum ({cfg.grad_accum})")
    kw: dict[str, Any] = dict(  # noqa: C408 - GRPOConfig keywords read best as such
        output_dir=str(cfg.output_dir),
        num_generations=cfg.num_generations,
        per_device_train_batch_size=per_step // cfg.grad_accum,
        gradient_accumulation_steps=cfg.grad_accum,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=max(0, cfg.top_k),
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        learning_rate=cfg.learning_rate,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        scale_rewards=cfg.scale_rewards,
        max_steps=cfg.max_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        log_completions=cfg.log_completions,
        bf16=dtype == torch.bfloat16 and not cpu,
        fp16=False,
        use_cpu=cpu,
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none",
        seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    if cfg.loss_type:
        kw["loss_type"] = cfg.loss_type
    if cfg.backend == "trl-vllm":
        if cpu:
            raise ValueError("backend trl-vllm needs a GPU (NCCL weight sync); use http")
        kw.update(use_vllm=True, vllm_mode="server", vllm_server_base_url=cfg.url)
    return GRPOConfig(**kw)


def run_grpo(cfg: GrpoRunConfig, *, problems: Sequence[Any] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train; returns a summary (also written to <output-dir>/grpo_summary.json)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from stepzip.data import load_problems
    from trainer.modeling import export_policy, on_cpu, pick_dtype, read_meta, resolve_model

    started = time.perf_counter()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model)
    meta = read_meta(model_path)
    reward_cfg = cfg.reward_config(meta)
    dtype, cpu = pick_dtype(cfg.dtype), on_cpu()

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    skip_id = skip_token_id_of(tokenizer, reward_cfg.marker)
    if problems is None:
        problems = load_problems(cfg.dataset, cfg.split, limit=cfg.limit, offset=cfg.offset)
    dataset = Dataset.from_list(grpo_dataset_rows(problems, tokenizer))
    log(f"grpo: {len(dataset)} prompts, K={cfg.num_generations}, {cfg.prompts_per_step} "
        f"prompts/step, backend {cfg.backend}, policy {model_path}, dtype {dtype}; "
        f"marker {reward_cfg.marker!r} (id {skip_id}), delimiter "
        f"{reward_cfg.step_delimiter!r}; components {', '.join(reward_cfg.enabled())}")

    client = StepzipClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout)
    times = StepTimes()
    version_start = client.weight_version()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    served_vocab = model.get_input_embeddings().weight.shape[0]
    if skip_id is not None and skip_id >= served_vocab:
        raise ValueError(f"marker id {skip_id} is outside the model's {served_vocab} rows")

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        targets = cfg.lora_target if cfg.lora_target == "all-linear" else [
            t.strip() for t in cfg.lora_target.split(",") if t.strip()]
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 target_modules=targets, task_type="CAUSAL_LM")

    callbacks: list[Any] = [StepClockCallback(times)]
    sync = None
    rollout = None
    if cfg.backend == "http":
        rollout = ServerRollout(client, tokenizer, cfg, reward_cfg, times)
        if cfg.sync_weights:
            sync_dtype = dtype if cfg.sync_dtype == "auto" else pick_dtype(cfg.sync_dtype)
            sync = WeightSyncCallback(client, run_dir, times, dtype=sync_dtype,
                                      keep=cfg.keep_syncs, checksum=cfg.sync_checksum, log=log)
            callbacks.append(sync)
    else:
        callbacks.append(VersionProbeCallback(client, times))
    callbacks.append(MetricsCallback(run_dir, times, plot=cfg.plot))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=make_reward_funcs(reward_cfg, tokenizer),
        args=grpo_args(cfg, dtype, cpu),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
        rollout_func=rollout,
    )
    resume: Any = cfg.resume
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(run_dir))
        if resume is None:
            log("grpo: --resume latest, but no checkpoint yet; starting fresh")
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
        final_dir = run_dir / "final"
        save_dtype = dtype
        export_policy(trainer.model, final_dir, dtype=save_dtype, tokenizer=tokenizer)
        meta_out = {**meta, "stage": "grpo", "grpo_steps": trainer.state.global_step,
                    "marker": reward_cfg.marker, "delimiter": reward_cfg.step_delimiter,
                    "think_close": reward_cfg.think_close, "skip_token_id": skip_id}
        (final_dir / "stepzip_train.json").write_text(json.dumps(meta_out, indent=2,
                                                                 default=str))
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
        "weight_version_end": _safe(client.weight_version),
        "syncs": sync.history if sync else [],
        "train_seconds": train_s,
        "seconds": time.perf_counter() - started,
        "time_split": time_split(this_run),
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

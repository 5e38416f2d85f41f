"""Stage 2: supervised fine-tuning on (problem, compressed CoT) pairs with TRL SFTTrainer.

* The marker (``[SKIP]``) becomes one token of the tokenizer, a NORMAL token by default:
  TRL's GRPO decodes completions with ``skip_special_tokens=True``, which would delete a
  special marker from the text the rewards read. (The reward still counts ids when a
  tokenizer is given, so ``--skip-token special`` works too.) The embeddings grow by
  one row; the served model's vocabulary cannot grow at reload time, so this folder is
  what the GRPO-stage server must be started with.
* Prompt-completion rows: TRL masks the prompt, so the loss is on the completion only
  (``completion_only_loss=True``) and appends EOS to each completion;
  ``--no-completion-only-loss`` (paper-code) trains on the whole sequence.
* LoRA by default (``--no-lora`` for a full fine-tune); the adapter is merged before saving, and the marker's
  embedding row is trained too (through a gradient mask: peft's
  ``trainable_token_indices`` wraps the tied head, which TRL's fused LM head bypasses).
* The output folder is servable: config + safetensors + tokenizer + chat template, and
  ``stepzip_train.json`` (marker, its id, delimiter, think tag) for the GRPO stage,
  ``metrics.jsonl`` (the logged loss per step) and ``sft_loss.png``. Checkpoints (only
  with ``--save-steps``) hold no optimizer state unless ``--save-optimizer``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from stepzip.constants import THINK_CLOSE
from trainer.build_sft import within_length
from trainer.common import (
    CheckpointHygieneCallback,
    TrainerCallback,
    lora_config,
    make_readable,
    model_card,
    resume_checkpoint,
    set_threads,
    trainer_kwargs,
)
from trainer.config import SftRunConfig
from trainer.metrics import METRICS_FILE, SFT_PLOT, append_record, plot_sft, safe_plot
from trainer.modeling import (
    META_FILE,
    add_skip_token,
    check_skip_token,
    export_policy,
    on_cpu,
    pick_dtype,
    resolve_model,
)


def load_pairs(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Pairs from build-sft's JSONL (rendered prompt, completion text) or from a
    `datasets` folder (``save_to_disk``) with ``prompt``/``completion`` columns: text, or
    TRL's conversational lists of messages (build-sft's ``<stem>.dataset``)."""
    if Path(path).is_dir():
        return _load_pair_folder(Path(path), limit)
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: not valid JSON") from None
            if not row.get("prompt") or not row.get("completion"):
                raise ValueError(f"{path}:{line_no}: a pair needs 'prompt' and 'completion'")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no pairs")
    return rows


def _load_pair_folder(path: Path, limit: int | None) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    missing = {"prompt", "completion"} - set(data.column_names)
    if missing:
        raise ValueError(f"{path}: a pair dataset needs the columns {sorted(missing)}")
    rows = list(data.select(range(min(limit, len(data)))) if limit is not None else data)
    if not rows:
        raise ValueError(f"{path}: no pairs")
    return rows


def pair_texts(row: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """(prompt, completion) as the text TRL trains on: conversational rows rendered with
    the chat template (the completion is what the full conversation adds to the prompt)."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        return prompt, completion
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return head, full[len(head):]


def data_meta(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Delimiter/marker/think tag the pairs were built with (the first row's)."""
    first = rows[0]
    return {k: first.get(k) for k in ("delimiter", "marker", "think_close")
            if first.get(k) is not None}


def run_sft(cfg: SftRunConfig, log=print) -> dict[str, Any]:
    """Train and save; returns the summary also written into stepzip_train.json."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    set_threads(cfg)
    base = resolve_model(cfg.model)
    rows = load_pairs(cfg.data, cfg.limit)
    meta = data_meta(rows)
    if meta.get("marker") and meta["marker"] != cfg.marker:
        raise ValueError(f"the pairs use marker {meta['marker']!r}, not {cfg.marker!r}")
    dtype = pick_dtype(cfg.dtype)
    cpu = on_cpu()
    log(f"sft: {len(rows)} pairs from {cfg.data}; base {base}; dtype {dtype}; "
        f"{'CPU' if cpu else 'GPU'}; {'LoRA r=' + str(cfg.lora_r) if cfg.lora else 'full'}")

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab_before = model.get_input_embeddings().weight.shape[0]
    skip_id = None
    if cfg.skip_token != "none":  # none (paper-code): spelled in ordinary tokens
        skip_id = add_skip_token(tokenizer, model, cfg.marker,
                                 special=cfg.skip_token == "special",
                                 pad_to_multiple_of=cfg.pad_vocab_multiple)
        check_skip_token(tokenizer, cfg.marker, skip_id)
    vocab_after = model.get_input_embeddings().weight.shape[0]
    log(f"sft: {cfg.marker!r} is token {skip_id} ({cfg.skip_token}); embeddings "
        f"{vocab_before} -> {vocab_after} rows")

    rendered = [dict(zip(("prompt", "completion"), pair_texts(r, tokenizer)), row=r)
                for r in rows]
    fits, too_long = within_length(
        rendered, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        cfg.max_length)
    rows = [r["row"] for r in fits]
    if not rows:
        raise ValueError(f"every pair is longer than max_length={cfg.max_length} tokens")
    log(f"sft: dropped {too_long} pairs longer than {cfg.max_length} tokens (not truncated)")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in rows])
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = output_dir / "checkpoints"
    metrics_path = output_dir / METRICS_FILE
    resume = resume_checkpoint(cfg.resume, ckpt_dir, log)
    if not resume:
        metrics_path.unlink(missing_ok=True)
    args = SFTConfig(
        **trainer_kwargs(cfg, ckpt_dir, dtype, cpu),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        packing=False,
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    card = model_card(stage="sft", base_model=base, lines=[
        f"data: {cfg.data} ({len(rows)} pairs)", f"marker {cfg.marker!r} = token {skip_id}",
        (f"LoRA r={cfg.lora_r} (merged)" if cfg.lora else "full fine-tune")
        + f", lr {cfg.learning_rate}"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora_config(cfg),
                         callbacks=[LossLogCallback(metrics_path, log),
                                    CheckpointHygieneCallback(card)])
    if cfg.lora and skip_id is not None:
        # The new marker's row must learn too. peft's trainable_token_indices wraps the
        # (tied) head, which TRL's fused LM head reads around; train the row through a
        # gradient mask on the embedding instead.
        train_token_rows(trainer.model, [skip_id])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t0

    policy = trainer.model
    save_dtype = dtype if cfg.save_dtype == "auto" else pick_dtype(cfg.save_dtype)
    t1 = time.perf_counter()
    if cfg.lora:
        policy = policy.merge_and_unload()
    policy.config.vocab_size = policy.get_input_embeddings().weight.shape[0]
    # Into the model folder itself (beside checkpoints/); stepzip_train.json, written
    # last, marks it complete.
    (output_dir / META_FILE).unlink(missing_ok=True)
    export_policy(policy, output_dir, dtype=save_dtype, tokenizer=tokenizer, atomic=False)
    (output_dir / "README.md").write_text(card)
    save_s = time.perf_counter() - t1

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    plot = safe_plot(plot_sft, metrics_path, output_dir / SFT_PLOT, log) if cfg.plot else None
    summary = {
        "stage": "sft",
        "base_model": base,
        "data": str(cfg.data),
        "pairs": len(rows),
        "marker": cfg.marker,
        "skip_token_id": skip_id,
        "skip_token_kind": cfg.skip_token,
        "vocab_rows": vocab_after,
        "tokenizer_size": len(tokenizer),
        "delimiter": meta.get("delimiter"),
        "think_close": meta.get("think_close", THINK_CLOSE),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "losses": losses,
        "metrics": str(metrics_path),
        "plot": str(plot) if plot else None,
        "train_seconds": train_s,
        "save_seconds": save_s,
        "seconds": time.perf_counter() - started,
        "dtype": str(save_dtype).removeprefix("torch."),
        "config": dataclasses.asdict(cfg),
    }
    (output_dir / META_FILE).write_text(json.dumps(summary, indent=2))
    make_readable(output_dir)
    log(f"sft: {summary['steps']} steps, loss {losses[0] if losses else float('nan'):.3f} -> "
        f"{losses[-1] if losses else float('nan'):.3f}; train {train_s:.1f} s, save "
        f"{save_s:.1f} s; model in {output_dir}; loss curve {plot}")
    return summary


class LossLogCallback(TrainerCallback):
    """SFT progress: one line per logged step on the console and in metrics.jsonl."""

    def __init__(self, path: Path, log=print):
        self.path, self.log = path, log
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:
            return
        append_record(self.path, {"step": state.global_step, "time": time.time(), **logs})
        if "loss" in logs:
            self.log(f"sft: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                     f"({time.perf_counter() - self.t0:.0f} s)")


def train_token_rows(model: Any, rows: list[int]) -> None:
    """Make only `rows` of the (possibly tied) input embedding trainable: the whole
    matrix gets requires_grad and a hook zeroes every other row's gradient, so Adam
    (zero moments) and a zero weight decay leave the other rows exactly as they were."""
    import torch

    weight = model.get_input_embeddings().weight
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1.0
    weight.register_hook(lambda grad: grad * mask)

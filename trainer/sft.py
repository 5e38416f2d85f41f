"""Stage 2: supervised fine-tuning on (problem, compressed CoT) pairs with TRL SFTTrainer.

* The marker (``[SKIP]``) becomes one token of the tokenizer, a NORMAL token by default:
  TRL's GRPO decodes completions with ``skip_special_tokens=True``, which would delete a
  special marker from the text the rewards read. (The reward still counts ids when a
  tokenizer is given, so ``--skip-token special`` works too.) The embeddings grow by
  one row; the served model's vocabulary cannot grow at reload time, so this folder is
  what the GRPO-stage server must be started with.
* Prompt-completion rows: TRL masks the prompt, so the loss is on the completion only
  (``completion_only_loss=True``) and appends EOS to each completion.
* Optional LoRA (``--lora``); the adapter is merged before saving, and the marker's
  embedding row is trained too (through a gradient mask: peft's
  ``trainable_token_indices`` wraps the tied head, which TRL's fused LM head bypasses).
* The output folder is servable: config + safetensors + tokenizer + chat template, and
  ``stepzip_train.json`` (marker, its id, delimiter, think tag) for the GRPO stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from stepzip.constants import THINK_CLOSE
from trainer.config import SftRunConfig
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


def data_meta(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Delimiter/marker/think tag the pairs were built with (the first row's)."""
    first = rows[0]
    return {k: first.get(k) for k in ("delimiter", "marker", "think_close")
            if first.get(k) is not None}


def run_sft(cfg: SftRunConfig, log=print) -> dict[str, Any]:
    """Train and save; returns the summary also written into stepzip_train.json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    base = resolve_model(cfg.model)
    rows = load_pairs(cfg.data, cfg.limit)
    meta = data_meta(rows)
    if meta.get("marker") and meta["marker"] != cfg.marker:
        raise ValueError(f"the pairs use marker {meta['marker']!r}, not {cfg.marker!r}")
    dtype = pick_dtype(cfg.dtype)
    cpu = on_cpu()
    log(f"sft: {len(rows)} pairs from {cfg.data}; base {base}; dtype {dtype}; "
        f"{'CPU' if cpu else 'GPU'}")

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab_before = model.get_input_embeddings().weight.shape[0]
    skip_id = add_skip_token(tokenizer, model, cfg.marker, special=cfg.skip_token == "special",
                             pad_to_multiple_of=cfg.pad_vocab_multiple)
    check_skip_token(tokenizer, cfg.marker, skip_id)
    vocab_after = model.get_input_embeddings().weight.shape[0]
    log(f"sft: {cfg.marker!r} is token {skip_id} ({cfg.skip_token}); embeddings "
        f"{vocab_before} -> {vocab_after} rows")

    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in rows])
    output_dir = Path(cfg.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
        bf16=dtype == torch.bfloat16 and not cpu,
        fp16=False,
        use_cpu=cpu,
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        disable_tqdm=False,
    )
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        targets = cfg.lora_target if cfg.lora_target == "all-linear" else [
            t.strip() for t in cfg.lora_target.split(",") if t.strip()]
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                 task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    if cfg.lora:
        # The new marker's row must learn too. peft's trainable_token_indices wraps the
        # (tied) head, which TRL's fused LM head reads around; train the row through a
        # gradient mask on the embedding instead.
        train_token_rows(trainer.model, [skip_id])
    resume = cfg.resume
    if resume == "latest":
        resume = True
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
    save_s = time.perf_counter() - t1

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
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
        "train_seconds": train_s,
        "save_seconds": save_s,
        "seconds": time.perf_counter() - started,
        "dtype": str(save_dtype).removeprefix("torch."),
        "config": dataclasses.asdict(cfg),
    }
    (output_dir / META_FILE).write_text(json.dumps(summary, indent=2))
    log(f"sft: {summary['steps']} steps, loss {losses[0] if losses else float('nan'):.3f} -> "
        f"{losses[-1] if losses else float('nan'):.3f}; train {train_s:.1f} s, save "
        f"{save_s:.1f} s; model in {output_dir}")
    return summary


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

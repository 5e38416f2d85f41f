"""What the SFT and GRPO stages build alike from `TrainingArgs`: TRL/transformers trainer
arguments, the LoRA config, threads, resume and the checkpoint hygiene (no optimizer
state unless asked, keep-last-N, files readable by other users, a truthful model card)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.config import TrainingArgs

try:  # transformers is in the train extra; keep this module importable without it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]


def set_threads(args: TrainingArgs) -> None:
    """Cap torch's CPU threads (the box is shared with an engine pinned to one core)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def trainer_kwargs(args: TrainingArgs, output_dir: str | Path, dtype: Any,
                   cpu: bool) -> dict[str, Any]:
    """Keyword arguments of transformers' TrainingArguments both stages pass to TRL."""
    import torch

    return dict(  # noqa: C408 - TrainingArguments keywords read best as such
        output_dir=str(output_dir),
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        gradient_accumulation_steps=args.grad_accum,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        bf16=dtype == torch.bfloat16 and not cpu,
        fp16=False,
        use_cpu=cpu,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=args.report_to,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        # Optimizer state is 2x the trainable weights in fp32 (1 GB for a full 135M model);
        # without it a resume restarts Adam's moments and the LR schedule.
        save_only_model=not args.save_optimizer,
        dataloader_num_workers=0,
    )


def lora_config(args: TrainingArgs) -> Any:
    """peft's LoraConfig for `args`, or None when LoRA is off."""
    if not args.lora:
        return None
    from peft import LoraConfig

    targets = args.lora_target if args.lora_target == "all-linear" else [
        t.strip() for t in args.lora_target.split(",") if t.strip()]
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def resume_checkpoint(resume: str | None, checkpoints: str | Path,
                      log: Any = print) -> str | None:
    """The checkpoint folder to resume from ('latest' = the newest under `checkpoints`)."""
    if resume != "latest":
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(checkpoints)) if Path(checkpoints).is_dir() else None
    if found is None:
        log(f"--resume latest: no checkpoint under {checkpoints} yet; starting fresh")
    return found


def make_readable(folder: str | Path) -> None:
    """Files 0644, folders 0755: the serving user (another uid in a container) must read
    what the trainer wrote; safetensors writes through a 0600 temp file."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)
        for name in files:
            os.chmod(Path(root) / name, 0o644)
    os.chmod(folder, 0o755)


def model_card(*, stage: str, base_model: str, lines: list[str]) -> str:
    """README.md of a trained folder: what it was trained from and how (TRL's own card
    names a local base model "[None]")."""
    body = "\n".join(f"- {line}" for line in lines)
    return (f"---\nlibrary_name: transformers\ntags: [stepzip, {stage}, trl]\n---\n\n"
            f"# stepzip {stage} policy\n\nTrained with stepzip's `stepzip train {stage}` "
            f"from `{base_model}`.\n\n{body}\n")


class CheckpointHygieneCallback(TrainerCallback):
    """After TRL writes a checkpoint: replace its model cards (the checkpoint's and the
    one TRL leaves in the output folder) and make the checkpoint readable."""

    def __init__(self, card: str):
        self.card = card

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for card in (folder / "README.md", Path(args.output_dir) / "README.md"):
            if card.is_file():
                card.write_text(self.card)
        if folder.is_dir():
            make_readable(folder)

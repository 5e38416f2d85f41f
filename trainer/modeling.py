"""Model/tokenizer helpers shared by the SFT and GRPO stages (torch, transformers)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

META_FILE = "stepzip_train.json"


def resolve_model(model: str) -> str:
    """'default' -> the prepared embedded SmolLM2 folder; anything else unchanged."""
    if model in ("default", "", None):
        from stepzip.modelcache import prepare_default_model

        return str(prepare_default_model())
    return model


def pick_dtype(name: str) -> Any:
    """torch dtype for 'auto' | 'float32' | 'bfloat16'; auto = bf16 on a bf16 GPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The stepzip_train.json an SFT folder carries ({} when absent)."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def add_skip_token(tokenizer: Any, model: Any, marker: str, *, special: bool = False,
                   pad_to_multiple_of: int | None = None) -> int:
    """Add `marker` as one token (normal by default) and grow the embeddings.

    A normal token survives ``decode(..., skip_special_tokens=True)`` (what TRL does to
    completions), so rewards can count it in text; as a special token it would vanish
    from the text and could only be counted from ids. ``normalized=False`` keeps the
    tokenizer from lower-casing or splitting it. The new row starts at the mean of the
    embeddings of the pieces the marker used to be spelled with, so the model begins
    with the meaning it already gave the text "[SKIP]". Returns the marker's id.
    Idempotent: a tokenizer that already holds the marker is left as it is.
    """
    import torch
    from tokenizers import AddedToken

    pieces = tokenizer.encode(marker, add_special_tokens=False)
    existing = tokenizer.convert_tokens_to_ids(marker)
    if existing is not None and existing != tokenizer.unk_token_id and (
            tokenizer.encode(marker, add_special_tokens=False) == [existing]):
        token_id = existing
    else:
        token = AddedToken(marker, special=special, normalized=False, single_word=False,
                           lstrip=False, rstrip=False)
        tokenizer.add_tokens([token], special_tokens=special)
        token_id = tokenizer.convert_tokens_to_ids(marker)
    embeddings = model.get_input_embeddings()
    if embeddings.weight.shape[0] <= token_id or pad_to_multiple_of:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of,
                                      mean_resizing=False)
        embeddings = model.get_input_embeddings()
        with torch.no_grad():
            piece_ids = [p for p in pieces if p < token_id] or [tokenizer.eos_token_id]
            embeddings.weight[token_id] = embeddings.weight[piece_ids].mean(dim=0)
            extra = embeddings.weight.shape[0] - len(tokenizer)
            if extra > 0:
                # Padding rows are real (sampleable) vocabulary to a server that reads
                # config.vocab_size; give them the unknown token's row, which a trained
                # model rarely predicts, rather than a copy of the new marker's.
                filler = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
                embeddings.weight[len(tokenizer):] = embeddings.weight[filler]
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != embeddings.weight.data_ptr():
            with torch.no_grad():
                output.weight[token_id] = output.weight[piece_ids].mean(dim=0)
    return int(token_id)


def check_skip_token(tokenizer: Any, marker: str, token_id: int) -> None:
    """The marker must encode to its one id and decode back with skip_special_tokens."""
    sample = f"a\n{marker}\nb{marker} c"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    if ids.count(token_id) != 2:
        raise RuntimeError(f"{marker!r} does not encode to its token {token_id}: {ids}")
    if tokenizer.decode(ids, skip_special_tokens=True).count(marker) != 2 and \
            marker not in getattr(tokenizer, "all_special_tokens", []):
        raise RuntimeError(f"{marker!r} does not survive decoding")


def policy_state_dict(model: Any) -> tuple[Any, dict[str, Any]]:
    """(base model, {name: tensor}) of a plain or PEFT policy under the names a servable
    checkpoint uses, LoRA deltas added into fresh tensors: the model itself is not
    touched (merging in place and unmerging after every push would drift the frozen
    weights by a rounding error each time)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is in the train extra
        return model, model.state_dict()
    if not isinstance(model, PeftModel):
        return model, model.state_dict()
    import torch

    base = model.get_base_model()
    deltas: dict[str, Any] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    with torch.no_grad():
                        delta = module.get_delta_weight(adapter)
                    key = f"{name}.weight"
                    deltas[key] = delta if key not in deltas else deltas[key] + delta
    state = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "original_module" in name:
            continue
        name = name.replace(".base_layer", "").replace("modules_to_save.default.", "")
        state[name] = tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor
    return base, state


def export_policy(model: Any, folder: Path, *, dtype: Any = None, tokenizer: Any = None,
                  atomic: bool = True) -> Path:
    """Write a servable safetensors folder (config + weights [+ tokenizer]).

    atomic: written beside `folder` and renamed into place, so a reader (the server)
    never sees half of it; otherwise the files are written into `folder` directly.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    target = folder.with_name(f".{folder.name}.tmp") if atomic else folder
    if atomic and target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    base, state = policy_state_dict(model)
    tied = getattr(base.config, "tie_word_embeddings", False)
    tensors = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():  # save_file refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = base.config
    saved_dtype = getattr(config, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    try:
        config.save_pretrained(target)
    finally:
        config.dtype = saved_dtype
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    if atomic:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(target, folder)
    return folder

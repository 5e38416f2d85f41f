"""Oracle of Model Runner V2's penalties (vllm/v1/worker/gpu/sample/penalties.py,
vLLM 0.32) written out in float64: repetition scales the logits of tokens seen in prompt
or output (divide if positive, else multiply), then frequency x count and presence x seen
are subtracted. Shared by the unit and integration penalty tests."""

from __future__ import annotations

import torch


def v2_penalised(row: torch.Tensor, prompt: list[int], out: list[int], presence: float,
                 frequency: float, repetition: float) -> torch.Tensor:
    """One logits row [vocab] after V2's penalties, given the outputs so far."""
    x = row.double().clone()  # [vocab]
    vocab = x.shape[-1]
    counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).double()
    seen_out = counts > 0
    seen = seen_out.clone()
    seen[torch.tensor(prompt, dtype=torch.long)] = True
    scale = torch.where(seen, torch.tensor(repetition, dtype=torch.float64), 1.0)
    x = x * torch.where(x > 0, 1.0 / scale, scale)
    return x - frequency * counts - presence * seen_out.double()


def v2_penalised_rows(rows: torch.Tensor, prompt: list[int], out: list[int],
                      penalties: dict) -> list[torch.Tensor]:
    """rows[t] ([T, vocab]) sampled out[t] after out[:t]: each row penalised as V2 does."""
    return [v2_penalised(rows[t], prompt, out[:t], penalties["presence_penalty"],
                         penalties["frequency_penalty"], penalties["repetition_penalty"])
            for t in range(len(out))]


def entropy64(x: torch.Tensor) -> float:
    logp = torch.log_softmax(x.double(), dim=-1)
    return float(-(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum())

"""One distribution on both runners: the entropy of penalised requests on the legacy one.

Model Runner V2 calls custom processors after its built-in bias, penalty and bad-words
stages; the legacy runner calls them after bias and bad words but *before* presence,
frequency and repetition penalties (vLLM 0.32 `Sampler.apply_logits_processors`). The
reported entropy is defined as V2 sees it: after penalties, before temperature. So on the
legacy runner, rows of penalised requests get their entropy from a copy of their logits
with vLLM's own `apply_all_penalties` applied, the same call the sampler makes next.
Unpenalised requests (the usual case) cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.entropy import entropy_from_logits


@dataclass(frozen=True)
class Penalty:
    presence: float
    frequency: float
    repetition: float
    prompt_ids: list[int]

    @classmethod
    def of(cls, params, prompt_ids) -> Penalty | None:
        """The request's penalties, or None when it has none (vLLM's neutral values)."""
        if params is None:
            return None
        p, f, r = params.presence_penalty, params.frequency_penalty, params.repetition_penalty
        if p == 0.0 and f == 0.0 and r == 1.0:
            return None
        return cls(p, f, r, list(prompt_ids or ()))


def penalised_entropies(values: torch.Tensor, logits: torch.Tensor,
                        items: list[tuple[int, int, Penalty, list[int]]]) -> torch.Tensor:
    """values: [n] entropies of the tracked rows; items: (index into values, logits row,
    penalty, live output ids) of the penalised ones. Returns values with those replaced by
    the entropy after penalties."""
    from vllm.utils.torch_utils import make_tensor_with_pad
    from vllm.v1.sample.ops.penalties import apply_all_penalties

    device, vocab = logits.device, logits.shape[1]
    at = torch.tensor([i for i, _, _, _ in items], dtype=torch.long).to(device)  # [p]
    rows = torch.tensor([r for _, r, _, _ in items], dtype=torch.long).to(device)  # [p]
    penalties = [pen for _, _, pen, _ in items]
    # prompt: [p, longest prompt] int64, padded with `vocab` as vLLM pads it
    prompt = make_tensor_with_pad([pen.prompt_ids for pen in penalties], pad=vocab,
                                  device="cpu", dtype=torch.int64).to(device)

    def column(name: str) -> torch.Tensor:  # [p] float32
        return torch.tensor([getattr(pen, name) for pen in penalties],
                            dtype=torch.float32).to(device)

    penalised = apply_all_penalties(
        logits.index_select(0, rows).float(), prompt, column("presence"),  # [p, vocab] copy
        column("frequency"), column("repetition"), [list(out) for _, _, _, out in items])
    return values.index_copy(0, at, entropy_from_logits(penalised))

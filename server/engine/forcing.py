"""Teacher forcing for /v1/score: the engine "generates" a given token sequence, so given
reasoning gets its entropies from the same processor, positions and batches as sampled
reasoning.

A request carries its tokens in `SamplingParams.extra_args[FORCE_KEY]`. At output
position i the processor raises token i's logit to FORCED_LOGIT: any sampler then picks
it (greedy, or softmax probability 1), and only one value per row is written, never the
whole row. It must run AFTER the entropy processor, which then measures the unforced
distribution. vLLM 0.32 applies custom processors in list order in both runners: the legacy runner
builds `LogitsProcessors(chain(BUILTIN, custom))` and splits it by argmax invariance
keeping the order (both processors here are not argmax-invariant); Model Runner V2's
`Sampler.logits_processors` is `[bias, penalties, bad_words, *custom]`. The engine
registers `[entropy, forcing]`.

Two adapters over one core, like processor_v1/processor_v2: the legacy (V1) runner's
persistent-batch rows and Model Runner V2's recycled request slots.
"""

from __future__ import annotations

import torch

from server.engine import logprobs_reuse

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2
except ModuleNotFoundError as exc:  # only a missing vLLM; a broken one must still fail
    if exc.name != "vllm":
        raise
    # clients/forcecheck.py replays the V2 adapter on a CUDA machine without vLLM.
    BatchUpdate = MoveDirectionality = None
    LogitsProcessor = LogitsProcessorV2 = object


def move_rows(rows: dict, moved) -> None:
    """Apply a legacy-runner BatchUpdate's moves to a row -> state dict: (a, b, UNIDIR)
    moves a's state to b; (a, b, SWAP) exchanges them."""
    for a, b, direction in moved:
        held_a = rows.pop(a, None)
        held_b = rows.pop(b, None)
        if held_a is not None:
            rows[b] = held_a
        if direction == MoveDirectionality.SWAP and held_b is not None:
            rows[a] = held_b

# SamplingParams.extra_args key carrying the token ids to force.
FORCE_KEY = "stepzip_forced_ids"
# Finite, so a softmax over the row stays defined; exp(x - 1e30) underflows to 0 for any
# real logit. Both runners hand processors float32 logits.
FORCED_LOGIT = 1e30


def teacher_forcing(token_ids: list[int]) -> dict:
    """SamplingParams arguments that make a request emit exactly `token_ids`.

    Greedy (the cheapest sampler path); `ignore_eos` so an EOS or stop id inside the
    given text does not end it early.
    """
    return {"max_tokens": len(token_ids), "temperature": 0.0, "top_p": 1.0, "top_k": -1,
            "ignore_eos": True, "extra_args": {FORCE_KEY: list(token_ids)}}


def forced_ids(sampling_params) -> list[int] | None:
    return (sampling_params.extra_args or {}).get(FORCE_KEY) if sampling_params else None


def validate_forced(sampling_params) -> None:
    ids = forced_ids(sampling_params)
    if ids is None:
        return
    if not isinstance(ids, list) or not ids or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"extra_args.{FORCE_KEY} must be a non-empty list of token ids")


def force_rows(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """In place: row rows[j] ([n] long) now picks tokens[j] ([n] long)."""
    logits.index_put_((rows, tokens),
                      torch.tensor(FORCED_LOGIT, dtype=logits.dtype, device=logits.device))


class ForcingProcessorV1(LogitsProcessor):
    """Legacy runner. A row's output position is the length of its live output-token list
    (the same rule the entropy processor uses), read on the host: no device sync."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.pin = is_pin_memory
        # row -> (tokens to force, live output-token list)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_forced(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _prompt_ids, output_ids in batch_update.added:
            self.rows.pop(row, None)
            if (ids := forced_ids(params)) is not None:
                self.rows[row] = (ids, output_ids)
        move_rows(self.rows, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        num_rows, vocab = logits.shape
        rows, tokens = [], []
        for row, (ids, output_ids) in self.rows.items():
            pos = len(output_ids)
            if row < num_rows and pos < len(ids) and ids[pos] < vocab:
                rows.append(row)
                tokens.append(ids[pos])
        if rows:
            host = torch.tensor([rows, tokens], dtype=torch.long, pin_memory=self.pin)
            index = host.to(self.device, non_blocking=True)  # [2, n]
            force_rows(logits, index[0], index[1])
            logprobs_reuse.note_changed()
        return logits


class ForcingProcessorV2(LogitsProcessorV2):
    """Model Runner V2. Each slot's tokens live on the device; `apply` finds each row's
    output position as the entropy processor does (pos + 1 - prompt_len) and forces
    without a host branch: rows that are not forced write back their own value."""

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self.device = req_states.device
        self.max_len = vllm_config.model_config.max_model_len
        n = req_states.max_num_reqs
        self.tokens = torch.zeros((n, self.max_len), dtype=torch.long,
                                  device=self.device)  # [slots, max_len] forced ids
        self.length = torch.zeros((n,), dtype=torch.long, device=self.device)  # [slots]
        self.staged: dict[int, list[int]] = {}
        self.forced_slots: set[int] = set()  # host mirror: skip apply when empty

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_forced(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        ids = (forced_ids(sampling_params) or [])[:self.max_len]
        self.staged[req_idx] = ids  # a recycled slot must lose its old tokens
        if ids:
            self.forced_slots.add(req_idx)
        else:
            self.forced_slots.discard(req_idx)
        return bool(ids)

    def apply_staged_writes(self) -> None:
        # Once per admitted request, not per step.
        for slot, ids in self.staged.items():
            self.length[slot] = len(ids)
            if ids:
                host = torch.tensor(ids, dtype=torch.long)
                self.tokens[slot, :len(ids)].copy_(host, non_blocking=True)
        self.staged.clear()

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if not self.forced_slots:
            return logits
        vocab = logits.shape[1]
        slots = ctx.expanded_idx_mapping.long()  # [rows]
        pos = ctx.pos.long()  # [rows]
        prompt_len = self.req_states.prompt_len.gpu.long()[slots]  # [rows]
        prefill_len = self.req_states.prefill_len.gpu.long()[slots]  # [rows]
        out_pos = pos + 1 - prompt_len  # [rows]
        valid = (pos + 1 >= prefill_len) & (out_pos >= 0) & (out_pos < self.length[slots])
        token = self.tokens[slots, out_pos.clamp(0, self.max_len - 1)]  # [rows]
        valid &= token < vocab
        token = torch.where(valid, token, 0)[:, None]  # [rows, 1]
        kept = logits.gather(1, token)  # [rows, 1]
        logits.scatter_(1, token, torch.where(valid[:, None], FORCED_LOGIT, kept))
        return logits

"""Entropy processor for vLLM's Model Runner V2 (the GPU default when Triton is present).

V2 calls `apply(logits, ctx)` with rows reordered every step; `ctx.expanded_idx_mapping`
maps row -> request slot and `ctx.pos` gives each row's input position. Slots are recycled
without a remove hook, so each slot's entry is (re)set in `add_request`. Everything in
`apply` stays on the device:

    out_pos = pos + 1 - prompt_len[slot]       # output index of the token sampled here
    valid   = pos + 1 >= prefill_len[slot]     # partial-prefill rows sample nothing

Invalid rows write into the store's scratch row, so no host branch is needed. Under
speculative decoding a request owns one row per draft token, each with its own `pos`; a
rejected draft's value is overwritten when that position is sampled for real.

vLLM is optional at import: `clients/gpucheck.py` replays this adapter on a CUDA machine
without vLLM against a stand-in of the V2 interface.
"""

from __future__ import annotations

import torch

try:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor
except ModuleNotFoundError as exc:  # only a missing vLLM; a broken one must still fail
    if exc.name != "vllm":
        raise
    LogitsProcessor = object

from server.engine.entropy import EXTRA_ARGS_KEY, entropy_from_logits, get_store, warm_up


class EntropyProcessorV2(LogitsProcessor):
    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self.device = req_states.device
        self.store = get_store(
            num_entries=2 * req_states.max_num_reqs + 64,
            max_len=vllm_config.model_config.max_model_len,
            device=self.device,
        )
        # slot_entry: [max_num_reqs] long, the store entry each slot writes to
        self.slot_entry = torch.full((req_states.max_num_reqs,), self.store.scratch,
                                     dtype=torch.long, device=self.device)
        self.slot_key: dict[int, str] = {}
        self.staged: dict[int, int] = {}
        warm_up(self.device, req_states.vocab_size)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        key = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY} must be a string")

    def add_request(self, req_idx: int, sampling_params) -> bool:
        if (previous := self.slot_key.pop(req_idx, None)) is not None:
            self.store.mark_idle(previous)
        key = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if key is None:
            self.staged[req_idx] = self.store.scratch
            return False
        # A key is one request: a resumed request may land in another slot, so drop the
        # stale mapping of its old slot (that slot's later reuse must not mark it idle).
        for slot in [s for s, k in self.slot_key.items() if k == key]:
            del self.slot_key[slot]
            self.staged[slot] = self.store.scratch
        self.slot_key[req_idx] = key
        self.staged[req_idx] = self.store.entry_for(key)
        return True

    def apply_staged_writes(self) -> None:
        if not self.staged:
            return
        host = torch.tensor([list(self.staged), list(self.staged.values())], dtype=torch.long)
        index = host.to(self.device, non_blocking=True)  # [2, n]
        self.slot_entry.index_put_((index[0],), index[1])
        self.staged.clear()

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if not self.slot_key:
            return logits
        slots = ctx.expanded_idx_mapping.long()  # [rows]
        pos = ctx.pos.long()  # [rows]
        prompt_len = self.req_states.prompt_len.gpu.long()[slots]  # [rows]
        prefill_len = self.req_states.prefill_len.gpu.long()[slots]  # [rows]
        entry = self.slot_entry[slots]  # [rows]
        out_pos = pos + 1 - prompt_len  # [rows]
        valid = (pos + 1 >= prefill_len) & (out_pos >= 0) & (out_pos < self.store.max_len)
        entry = torch.where(valid, entry, self.store.scratch)
        out_pos = torch.where(valid, out_pos, 0)
        values = entropy_from_logits(logits)  # [rows] float32
        self.store.buf.index_put_((entry, out_pos), values)
        return logits

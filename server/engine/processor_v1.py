"""Entropy processor for vLLM's legacy (V1) model runner: the CPU path, and GPU with
VLLM_USE_V2_MODEL_RUNNER=0.

Rows of `apply(logits)` are persistent-batch indices; `update_state` tells which request
sits in which row. A request's output position is the length of its output-token list
(vLLM hands us a live reference to it), read on the host: no device sync. Rows of a
partial (chunked) prefill write a provisional value at that position which the real
sampling step later overwrites, so the last write per position is always the real one.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from server.engine import entropy_cpu, logprobs_reuse
from server.engine.entropy import EXTRA_ARGS_KEY, entropy_from_logits, get_store, warm_up
from server.engine.forcing import move_rows
from server.engine.penalties import Penalty, penalised_entropies

# Under "vllm." so it reaches the handler vLLM configures in its worker process.
log = logging.getLogger("vllm.stepzip.entropy")


class EntropyProcessorV1(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        sched = vllm_config.scheduler_config
        self.store = get_store(
            num_entries=2 * sched.max_num_seqs + 64,
            max_len=vllm_config.model_config.max_model_len,
            device=device,
        )
        self.device = device
        self.pin = is_pin_memory
        # row -> (key, entry, live output-token list, penalties or None)
        self.rows: dict[int, tuple[str, int, list[int], Penalty | None]] = {}
        warm_up(device, vllm_config.model_config.get_vocab_size())
        # On the CPU the entropy pass also yields each row's log-normaliser, which the
        # sampler's processed logprobs can reuse (logprobs_reuse).
        self.reuse = (device.type == "cpu" and entropy_cpu.AVAILABLE
                      and getattr(vllm_config.model_config, "logprobs_mode", None) == "processed_logprobs"
                      and logprobs_reuse.install())
        log.info("entropy processor (legacy runner) on %s, %d torch threads", device,
                 torch.get_num_threads())

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        key = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY} must be a string")

    def is_argmax_invariant(self) -> bool:
        # It does not change logits, but it must run under all-greedy batches too.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            if (held := self.rows.pop(row, None)) is not None:
                self.store.mark_idle(held[0])
        for row, params, prompt_ids, output_ids in batch_update.added:
            old = self.rows.pop(row, None)
            if old is not None:
                self.store.mark_idle(old[0])
            key = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params else None
            if key is not None:
                self.rows[row] = (key, self.store.entry_for(key), output_ids,
                                  Penalty.of(params, prompt_ids))
        move_rows(self.rows, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.reuse:
            logprobs_reuse.offer(None)  # nothing from an earlier step survives
        if not self.rows:
            return logits
        num_rows = logits.shape[0]
        max_len = self.store.max_len
        rows, entries, positions, penalised = [], [], [], []
        for row, (_key, entry, output_ids, penalty) in self.rows.items():
            pos = len(output_ids)
            if row < num_rows and pos < max_len:
                if penalty is not None:
                    penalised.append((len(rows), row, penalty, output_ids))
                rows.append(row)
                entries.append(entry)
                positions.append(pos)
        if not rows:
            return logits
        index = self._to_device([rows, entries, positions])  # [3, n] long, rows distinct
        if 2 * len(rows) >= num_rows:
            # Most rows tracked (every row, in rollouts): entropy of the whole batch beats
            # copying the rows out first; pick the tracked rows from the [num_rows] result.
            if self.reuse:
                lse = torch.empty(num_rows, dtype=torch.float32)  # [num_rows]
                values = entropy_cpu.entropy_cpu(logits, lse_out=lse)
                logprobs_reuse.offer(logits, lse)
            else:
                values = entropy_from_logits(logits)  # [num_rows]
            values = values.index_select(0, index[0])  # [n]
        else:
            values = entropy_from_logits(logits.index_select(0, index[0]))  # [n]
        if penalised:  # this runner penalises after us; the entropy is of V2's order
            values = penalised_entropies(values, logits, penalised)
        self.store.buf.index_put_((index[1], index[2]), values)
        return logits

    def _to_device(self, lists: list[list[int]]) -> torch.Tensor:
        host = torch.tensor(lists, dtype=torch.long, pin_memory=self.pin)
        return host.to(self.device, non_blocking=True)

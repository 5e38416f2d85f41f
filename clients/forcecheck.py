"""Device check of teacher forcing (/v1/score) in Model Runner V2's interface, with torch
only (no vLLM: a stand-in of V2's request state and step context drives the adapters).

    python -m clients.forcecheck                  # CUDA, vocab 152,064
    python -m clients.forcecheck --device cpu --vocab 4096   # here, small

`EntropyProcessorV2` then `ForcingProcessorV2` run in V2's sampler order on the device,
greedy sampling after them, over request slots with shuffled rows, a chunked prefill,
a preemption resumed in another slot, an unforced keyed request and a keyless one.
Checks: forced requests emit exactly their tokens; other rows are untouched; fetched
entropies equal the float64 entropy of the unforced logits; `apply` of both under
`torch.cuda.set_sync_debug_mode("error")` (no host sync). Times the forcing `apply` next
to the entropy `apply` at [256, vocab] fp32. Prints one JSON line; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import server.engine.entropy as entropy_mod
from server.engine.forcing import FORCE_KEY, ForcingProcessorV2
from server.engine.processor_v2 import EntropyProcessorV2

KEY = entropy_mod.EXTRA_ARGS_KEY


class Slots:
    """V2's slot table: prompt/prefill lengths as device tensors re-bound on flush."""

    def __init__(self, device, max_reqs: int, max_len: int, vocab: int):
        self.device, self.vocab = device, vocab
        self.prompt_len = torch.zeros(max_reqs, dtype=torch.int32)
        self.prefill_len = torch.zeros(max_reqs, dtype=torch.int32)
        self.state = SimpleNamespace(device=device, max_num_reqs=max_reqs, vocab_size=vocab,
                                     prompt_len=SimpleNamespace(), prefill_len=SimpleNamespace())
        config = SimpleNamespace(model_config=SimpleNamespace(
            max_model_len=max_len, get_vocab_size=lambda: vocab))
        entropy_mod._STORE = None
        self.procs = [EntropyProcessorV2(config, self.state),
                      ForcingProcessorV2(config, self.state)]
        self.free = list(range(max_reqs))
        self.flush()

    def flush(self):
        self.state.prompt_len.gpu = self.prompt_len.to(self.device)
        self.state.prefill_len.gpu = self.prefill_len.to(self.device)
        for proc in self.procs:
            proc.apply_staged_writes()

    def add(self, req):
        req["slot"] = self.free.pop()
        self.prompt_len[req["slot"]] = req["prompt"]
        self.prefill_len[req["slot"]] = req["prompt"] + len(req["out"])
        req["done"] = 0
        params = SimpleNamespace(extra_args={k: v for k, v in (
            (KEY, req["key"]), (FORCE_KEY, req["forced"])) if v is not None})
        for proc in self.procs:
            proc.add_request(req["slot"], params)
        self.flush()

    def context(self, slots, pos):
        idx = torch.tensor(slots, dtype=torch.int32, device=self.device)
        return SimpleNamespace(expanded_idx_mapping=idx, idx_mapping=idx,
                               pos=torch.tensor(pos, dtype=torch.int64, device=self.device))

    def step(self, scheduled, gen, nosync: bool):
        random.shuffle(scheduled)
        ctx = self.context([r["slot"] for r, _ in scheduled],
                           [r["done"] + n - 1 for r, n in scheduled])
        logits = torch.randn(len(scheduled), self.vocab, generator=gen,
                             device=self.device) * 4
        before = logits.clone()
        if nosync and self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            for proc in self.procs:
                logits = proc.apply(logits, ctx)
        finally:
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        expected = reference_entropy(before)
        for row, (req, n) in enumerate(scheduled):
            req["done"] += n
            samples = req["done"] == req["prompt"] + len(req["out"])
            if req["forced"] is None or not samples:
                assert torch.equal(logits[row], before[row]), f"{req['name']}: row changed"
            if samples:
                req["expected"].append(expected[row])
                req["out"].append(int(logits[row].argmax()))


def reference_entropy(logits: torch.Tensor) -> list[float]:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).tolist()


def request(name, key, forced, prompt):
    return {"name": name, "key": key, "forced": forced, "prompt": prompt, "out": [],
            "expected": [], "slot": None, "done": 0}


def replay(device, vocab: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    rng = random.Random(0)
    run = Slots(device, max_reqs=8, max_len=256, vocab=vocab)
    a = request("A", "a", [rng.randrange(vocab) for _ in range(40)], 30)
    b = request("B", "b", [rng.randrange(vocab) for _ in range(25)], 12)
    c = request("C", "c", None, 7)  # entropies, sampled freely
    d = request("D", None, None, 5)  # neither
    for r in (a, b, c, d):
        run.add(r)
    run.step([(a, 20), (b, 12), (c, 7), (d, 5)], gen, nosync=True)  # A's prefill chunked
    run.step([(a, 10), (b, 1), (c, 1), (d, 1)], gen, nosync=True)
    while len(a["out"]) < 15:
        run.step([(a, 1), (b, 1), (c, 1), (d, 1)], gen, nosync=True)
    old_slot = a["slot"]
    run.free.insert(0, old_slot)  # A preempted; resumed in another slot (recompute)
    run.add(a)
    assert a["slot"] != old_slot
    run.step([(a, a["prompt"] + len(a["out"])), (b, 1), (c, 1)], gen, nosync=True)
    while len(a["out"]) < len(a["forced"]):
        live = [(r, 1) for r in (a, b) if len(r["out"]) < len(r["forced"])] + [(c, 1)]
        run.step(live, gen, nosync=True)
    store = run.procs[0].store
    got = store.fetch([(r["key"], len(r["out"])) for r in (a, b, c)])
    worst = 0.0
    for r in (a, b, c):
        diffs = [abs(x - y) for x, y in zip(got[r["key"]], r["expected"], strict=True)]
        worst = max(worst, *diffs)
    for r in (a, b):
        assert r["out"] == r["forced"], f"{r['name']} emitted other tokens"
    assert worst < 1e-4, f"entropy off by {worst:.2e} nats"
    return {"forced_tokens": len(a["out"]) + len(b["out"]), "worst_entropy_diff": worst}


def timing(device, vocab: int, rows: int = 256, rounds: int = 30) -> dict:
    """Median ms of each apply at [rows, vocab] fp32: entropy alone, forcing with every
    row forced, forcing with none (a batch without scoring requests skips it)."""
    run = Slots(device, max_reqs=rows, max_len=512, vocab=vocab)
    reqs = [request(f"r{i}", f"k{i}", [7] * 400, 10) for i in range(rows)]
    for r in reqs:
        run.add(r)
    ctx = run.context([r["slot"] for r in reqs], [r["prompt"] + 5 for r in reqs])
    logits = torch.randn(rows, vocab, device=device)

    def ms(fn) -> float:
        times = []
        for _ in range(rounds):
            x = logits.clone()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[3:])

    entropy_ms = ms(lambda x: run.procs[0].apply(x, ctx))
    forcing_ms = ms(lambda x: run.procs[1].apply(x, ctx))
    run.procs[1].forced_slots.clear()
    idle_ms = ms(lambda x: run.procs[1].apply(x, ctx))
    return {"rows": rows, "vocab": vocab, "entropy_apply_ms": entropy_ms,
            "forcing_apply_ms": forcing_ms, "forcing_idle_ms": idle_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=152_064)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"forcecheck": {"error": "no CUDA device"}}))
        return 2
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    status = 0
    for name, fn in (("replay", replay), ("timing", timing)):
        try:
            out[name] = fn(device, args.vocab)
        except Exception as exc:  # noqa: BLE001 - report and go on
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            status = 1
    print(json.dumps({"forcecheck": out}))
    return status


if __name__ == "__main__":
    sys.exit(main())

"""GPU check of the fused Triton entropy kernel: accuracy and speed against the memory floor.

    python -m clients.gpucheck [--vocab 152064] [--batches 1,8,64,256,1024] [--iters 20]

Needs CUDA, torch and Triton; does NOT need vLLM (it imports only
`server.engine.entropy` and `server.engine.entropy_triton`, and says so if anything
pulled vLLM in). On an H100 it runs in well under two minutes.

For each dtype (fp32, bf16) and batch size it
  * draws random logits (per-row scales from 0.05 to 30, a few rows with -inf entries:
    half masked, all but three masked, one near-one-hot row) and checks the kernel and
    `entropy_torch` against a float64 reference (-sum p log p over the same values);
  * times the kernel and `entropy_torch` with CUDA events (warm-up, median of N);
  * prints the memory floor = logit bytes / copy bandwidth, where the copy bandwidth
    is (read + write bytes) / time of a large device-to-device copy, and the ratio
    kernel_time / floor (1.0 = as fast as just reading the logits once).
It also checks non-contiguous rows and fp16, optionally sweeps launch configurations at
the largest batch, and ends with one JSON line (`{"gpucheck": ...}`). Exit code 0 when
every accuracy check passes, 1 when one fails, 2 when the machine cannot run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from server.engine import entropy_triton
from server.engine.entropy import entropy_torch

# Where the check runs; a module constant so a dry run can point it elsewhere.
DEVICE = "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ~150 us at 2 GHz per queued call: covers the host's launch time of one call.
_SLEEP_CYCLES_PER_CALL = 300_000
SWEEP = [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]


def reference_f64(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p in float64 over exactly the values the kernel reads; masked p = 0."""
    x = logits.double()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=torch.float64, device=x.device))
    return -plogp.sum(dim=-1)


def make_logits(batch: int, vocab: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    dev = DEVICE
    scale = torch.logspace(-1.3, 1.48, batch, device=dev)  # 0.05 .. 30
    scale = scale[torch.randperm(batch, device=dev, generator=gen)]
    x = torch.randn(batch, vocab, device=dev, generator=gen) * scale[:, None]
    x += torch.randn(batch, 1, device=dev, generator=gen) * 5  # row offsets: shift invariance
    if batch >= 2:  # half the vocabulary masked
        x[1, torch.rand(vocab, device=dev, generator=gen) < 0.5] = float("-inf")
    if batch >= 3:  # all but three masked (H <= log 3)
        keep = x[2, :3].clone()
        x[2] = float("-inf")
        x[2, [5, vocab // 2, vocab - 1]] = keep
    if batch >= 4:  # near one-hot (H ~ 0)
        x[3] = 0.0
        x[3, 7] = 60.0
    if batch >= 8:  # masked tail, like a padded vocabulary
        x[batch - 1, vocab - 1000 :] = float("-inf")
    return x.to(dtype)


def cuda_time_ms(fn, inputs: list, iters: int, warmup: int) -> float:
    """Median GPU time of one fn(x) call, in ms, measured with CUDA events.

    Each sample runs fn over every tensor in `inputs` (copies of the same logits, enough
    of them that one pass does not fit in L2, so small batches are timed from HBM, not
    from cache) and divides by their number. A GPU sleep queued ahead of the start event
    keeps the stream busy while the host enqueues, so launch overhead is not timed.
    """
    for _ in range(warmup):
        for x in inputs:
            fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(_SLEEP_CYCLES_PER_CALL * len(inputs)))
        start.record()
        for x in inputs:
            fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(inputs))
    return statistics.median(times)


def l2_busting_copies(
    logits: torch.Tensor, min_bytes: int = 128 << 20, max_copies: int = 1024
) -> list[torch.Tensor]:
    """[logits, clone, clone, ...] totalling at least min_bytes (or max_copies tensors)."""
    nbytes = logits.numel() * logits.element_size()
    count = max(1, min(max_copies, -(-min_bytes // max(nbytes, 1))))
    return [logits] + [logits.clone() for _ in range(count - 1)]


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Bytes per second moved (read + write) by a device-to-device copy of nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(dst.copy_, [src], iters, warmup=3)
    return 2 * nbytes / (ms * 1e-3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=152_064)
    ap.add_argument("--batches", default="1,8,64,256,1024")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs error (nats) vs float64")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    vllm_loaded = any(name == "vllm" or name.startswith("vllm.") for name in sys.modules)
    if not torch.cuda.is_available():
        print("gpucheck: CUDA is not available", file=sys.stderr)
        print(json.dumps({"gpucheck": {"ok": False, "error": "no cuda"}}))
        return 2
    if not entropy_triton.AVAILABLE:
        print("gpucheck: Triton is not importable", file=sys.stderr)
        print(json.dumps({"gpucheck": {"ok": False, "error": "no triton"}}))
        return 2

    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    batches = [int(b) for b in args.batches.split(",") if b]
    dtypes = [d for d in args.dtypes.split(",") if d]
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  # pragma: no cover
        triton_version = "?"
    print(
        f"device {props.name}, torch {torch.__version__}, triton {triton_version}, "
        f"vllm imported: {vllm_loaded}"
    )

    bw = copy_bandwidth(args.copy_mib << 20, iters=max(args.iters, 10))
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write of a {args.copy_mib} MiB copy)")

    results = []
    ok = True
    header = (
        f"{'dtype':>5} {'batch':>6} {'MB':>8} {'floor_us':>9} {'kernel_us':>10} "
        f"{'torch_us':>9} {'k/floor':>8} {'torch/k':>8} {'err_kernel':>11} {'err_torch':>10}"
    )
    print(header)
    print("-" * len(header))
    for dname in dtypes:
        dtype = DTYPES[dname]
        for batch in batches:
            logits = make_logits(batch, args.vocab, dtype, gen)
            ref = reference_f64(logits)
            got = entropy_triton.entropy_triton(logits)
            torch_h = entropy_torch(logits)
            finite = torch.isfinite(ref)
            err_k = (got.double() - ref)[finite].abs().max().item()
            err_t = (torch_h.double() - ref)[finite].abs().max().item()
            nan_ok = bool(torch.isfinite(got).eq(finite).all().item())
            passed = err_k <= args.tol and nan_ok
            ok &= passed
            del ref, torch_h
            inputs = l2_busting_copies(logits)
            k_ms = cuda_time_ms(entropy_triton.entropy_triton, inputs, args.iters, args.warmup)
            t_ms = cuda_time_ms(entropy_torch, inputs[:8], max(3, args.iters // 4), 2)
            del inputs
            nbytes = logits.numel() * logits.element_size()
            floor_ms = nbytes / bw * 1e3
            row = {
                "dtype": dname,
                "batch": batch,
                "bytes": nbytes,
                "floor_us": floor_ms * 1e3,
                "kernel_us": k_ms * 1e3,
                "torch_us": t_ms * 1e3,
                "kernel_over_floor": k_ms / floor_ms,
                "torch_over_kernel": t_ms / k_ms,
                "max_abs_err_kernel": err_k,
                "max_abs_err_torch": err_t,
                "pass": passed,
            }
            results.append(row)
            print(
                f"{dname:>5} {batch:>6} {nbytes / 1e6:>8.1f} {row['floor_us']:>9.1f} "
                f"{row['kernel_us']:>10.1f} {row['torch_us']:>9.1f} "
                f"{row['kernel_over_floor']:>8.2f} {row['torch_over_kernel']:>8.2f} "
                f"{err_k:>11.2e} {err_t:>10.2e}{'' if passed else '  FAIL'}"
            )
            del logits
            torch.cuda.empty_cache()

    # Layouts and dtypes the table does not cover: non-contiguous rows, fp16.
    extra = {}
    wide = torch.randn(16, args.vocab + 136, device=DEVICE, generator=gen) * 4
    view = wide[:, 72 : 72 + args.vocab]  # row stride != vocab, unaligned start
    extra["noncontiguous_err"] = (
        (entropy_triton.entropy_triton(view).double() - reference_f64(view)).abs().max().item()
    )
    half = make_logits(64, args.vocab, torch.float16, gen)
    ref = reference_f64(half)
    fin = torch.isfinite(ref)
    extra["fp16_err"] = (entropy_triton.entropy_triton(half).double() - ref)[fin].abs().max().item()
    for name, err in extra.items():
        good = err <= args.tol
        ok &= good
        print(f"{name}: {err:.2e}{'' if good else '  FAIL'}")
    del wide, view, half, ref

    sweep = []
    if not args.no_sweep:
        batch = max(batches)
        for dname in dtypes:
            logits = make_logits(batch, args.vocab, DTYPES[dname], gen)
            nbytes = logits.numel() * logits.element_size()
            floor_ms = nbytes / bw * 1e3
            inputs = l2_busting_copies(logits)
            for block, warps in SWEEP:

                def run(x, block=block, warps=warps):
                    return entropy_triton.entropy_triton(x, block_size=block, num_warps=warps)

                ms = cuda_time_ms(run, inputs, args.iters, args.warmup)
                sweep.append(
                    {
                        "dtype": dname,
                        "batch": batch,
                        "block_size": block,
                        "num_warps": warps,
                        "kernel_us": ms * 1e3,
                        "kernel_over_floor": ms / floor_ms,
                    }
                )
            del logits, inputs
            torch.cuda.empty_cache()
        print(
            f"launch-config sweep at batch {batch} (default block "
            f"{entropy_triton.DEFAULT_BLOCK_SIZE}, warps {entropy_triton.DEFAULT_NUM_WARPS}):"
        )
        for s in sweep:
            print(
                f"  {s['dtype']:>4} block {s['block_size']:>5} warps {s['num_warps']:>2}: "
                f"{s['kernel_us']:8.1f} us  k/floor {s['kernel_over_floor']:.2f}"
            )

    vllm_loaded = any(name == "vllm" or name.startswith("vllm.") for name in sys.modules)
    elapsed = time.perf_counter() - t_start
    print(f"{'PASS' if ok else 'FAIL'} in {elapsed:.1f} s")
    print(
        json.dumps(
            {
                "gpucheck": {
                    "ok": ok,
                    "device": props.name,
                    "torch": torch.__version__,
                    "triton": triton_version,
                    "vllm_imported": vllm_loaded,
                    "vocab": args.vocab,
                    "tol": args.tol,
                    "copy_bandwidth_GBps": bw / 1e9,
                    "results": results,
                    "extra": extra,
                    "sweep": sweep,
                    "seconds": elapsed,
                }
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

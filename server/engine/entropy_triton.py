"""Fused one-pass Triton kernel for the Shannon entropy of full next-token distributions.

One program per logits row walks the vocabulary in BLOCK_SIZE-wide chunks and keeps, per
lane, an online triple (m, s, t):

    m = running max of the lane's logits
    s = sum exp(x - m)
    t = sum exp(x - m) * (x - m)

rescaled whenever the lane's max grows. The lanes are folded together once at the end and

    H = log(s) - t / s        (nats; same value as entropy_torch)

so the row is read exactly once, in its own dtype (fp32 / bf16 / fp16), with float32
accumulation. Masked (-inf) logits have p = 0 and contribute nothing: every quantity that
could see -inf is selected away with `where` (never 0 * inf). Each step needs one exp per
element: with d = x - m, the new element's weight is exp(d) when d <= 0, otherwise the old
sums are rescaled by exp(-d) and the new element (now the max) weighs 1.

Distances are clamped at 80 nats, as `entropy_torch` clamps x - max at -80: a logit masked
with a huge *finite* negative (finfo.min, -1e38) then weighs exp(-80) ~ 1.8e-35 instead of
overflowing `t - d * s` into 0 * inf = NaN. NaN or +inf anywhere in a row makes the row's
entropy NaN (as in `entropy_torch`); a row with no finite logit gives NaN too.

Triton is imported guarded, so this module imports on machines without it (the CPU
build); `AVAILABLE` is True only when Triton imports and CUDA is present. The kernel also
runs under Triton's CPU interpreter (TRITON_INTERPRET=1 set before import), which is how
the unit tests check it without a GPU.
"""

from __future__ import annotations

import torch

try:  # guarded: the CPU build may have no (working) Triton
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - a broken install counts as absent
    triton = None
    tl = None
    _HAVE_TRITON = False

AVAILABLE: bool = bool(_HAVE_TRITON and torch.cuda.is_available())

# Launch defaults (per row: BLOCK_SIZE lanes, each thread holding BLOCK_SIZE / (32 * warps)).
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_NUM_WARPS = 8
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


if _HAVE_TRITON:

    @triton.jit
    def _entropy_kernel(
        logits_ptr,  # [rows, n_cols] fp32/bf16/fp16, unit column stride
        out_ptr,  # [rows] float32
        row_stride,  # elements between consecutive rows
        n_cols,
        BLOCK_SIZE: tl.constexpr,
        CLAMP: tl.constexpr = 80.0,  # entropy_torch's -_LOG_FLOOR
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        offs = tl.arange(0, BLOCK_SIZE)

        # Per-lane online state; a lane that has seen only -inf has m = -inf, s = t = 0.
        m = tl.full([BLOCK_SIZE], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        t = tl.zeros([BLOCK_SIZE], dtype=tl.float32)

        bad = tl.zeros([BLOCK_SIZE], dtype=tl.int32)  # lanes that saw NaN or +inf
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            bad = bad | ((x != x) | (x == float("inf"))).to(tl.int32)  # noqa: PLR0124  (NaN test)
            valid = (x > float("-inf")) & (x < float("inf"))  # NaN compares false too
            # Distance to the lane's running max; forced to 0 (finite) when either side is
            # -inf: a masked element is discarded below, and a lane's first finite element
            # then gives s = 0 + exp(0) = 1, t = 0 + 1 * 0 = 0, exactly its own state.
            d = tl.where(valid & (m > float("-inf")), x - m, 0.0)
            a = tl.minimum(tl.abs(d), CLAMP)  # |d| clamped like entropy_torch's floor
            z = tl.exp(-a)  # exp(d) if d <= 0, exp(-d) if d > 0; never overflows
            up = d > 0.0
            # d > 0: x is the new max; old sums rescale by z = exp(m - x) and
            #        t' = z * (t + (m - x) * s); x itself adds weight 1 at offset 0.
            # d <= 0: max unchanged; x adds weight z = exp(d) at offset d.
            s_new = tl.where(up, s * z + 1.0, s + z)
            t_new = tl.where(up, z * (t - a * s), t - z * a)
            s = tl.where(valid, s_new, s)
            t = tl.where(valid, t_new, t)
            m = tl.where(valid, tl.maximum(m, x), m)

        # Fold the lanes onto the row max M: a lane contributes
        # exp(m - M) * s and exp(m - M) * (t + (m - M) * s); empty lanes contribute 0.
        m_row = tl.max(m, axis=0)
        live = m > float("-inf")
        delta = tl.where(live, tl.maximum(m - m_row, -CLAMP), 0.0)
        alpha = tl.where(live, tl.exp(delta), 0.0)
        s_row = tl.sum(alpha * s, axis=0)
        t_row = tl.sum(alpha * (t + delta * s), axis=0)
        h = tl.log(s_row) - t_row / s_row
        h = tl.where(tl.max(bad, axis=0) > 0, float("nan"), h)
        tl.store(out_ptr + row, h)


def entropy_triton(
    logits: torch.Tensor,
    *,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """[rows, vocab] logits (fp32/bf16/fp16, any row stride) -> [rows] float32 nats.

    `block_size` (a power of two) and `num_warps` override the launch defaults; they are
    there for tuning (clients/gpucheck.py sweeps them).
    """
    if not _HAVE_TRITON:
        raise RuntimeError("entropy_triton needs Triton, which is not importable here")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in _SUPPORTED:
        logits = logits.float()
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    block = block_size or min(DEFAULT_BLOCK_SIZE, max(16, triton.next_power_of_2(vocab)))
    if block & (block - 1):
        raise ValueError(f"block_size must be a power of two, got {block}")
    warps = num_warps or (DEFAULT_NUM_WARPS if block >= 2048 else 4)
    grid = (rows,)
    if logits.is_cuda:
        with torch.cuda.device(logits.device):
            _entropy_kernel[grid](
                logits, out, logits.stride(0), vocab, BLOCK_SIZE=block, num_warps=warps
            )
    else:  # Triton's CPU interpreter (TRITON_INTERPRET=1)
        _entropy_kernel[grid](
            logits, out, logits.stride(0), vocab, BLOCK_SIZE=block, num_warps=warps
        )
    return out

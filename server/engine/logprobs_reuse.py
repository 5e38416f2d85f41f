"""The sampler's processed logprobs from the entropy pass's log-normaliser (legacy runner,
CPU).

With `logprobs_mode="processed_logprobs"` (stepzip's default, as TRL's `vllm-serve`),
vLLM's CPU sampler takes a full `log_softmax` of every row at every step, whether or not
anyone asked for logprobs. On a rollout step the entropy processor has just read the
same rows and computed each one's log-normaliser lse = max + log sum exp(x - max) on the
way to H. When nothing after it changed the logits (no penalties, no thinking budget,
no forced rows, temperature exactly 1 or greedy, both of which vLLM divides by 1.0, and
no top-k, top-p or min-p), the processed logprobs are `logits - lse`: one subtraction
pass, written over the logits (vLLM reads them after sampling only to count NaNs, and
then a copy is made), instead of a second pass over the vocabulary with `exp` into a
fresh [rows, vocab] tensor.

`install()` wraps `Sampler.sample` in the worker. Per step the entropy processor
`offer`s the lse of the tensor it read, the forcing processor says when it changed rows,
and the wrapper uses the lse only for that very tensor and only when the batch's
sampling metadata vouches that nothing else touched it; everything else takes vLLM's
own path unchanged. Tokens never depend on this: the sampler draws from the logits, not
the logprobs.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger("vllm.stepzip.logprobs_reuse")

# What the wrapper relies on in vLLM 0.32 (names of parameters and fields).
SAMPLE_PARAMS = ("logits", "sampling_metadata", "logprobs_mode_override")
METADATA_FIELDS = ("temperature", "all_greedy", "top_k", "top_p", "no_penalties",
                   "logitsprocs", "thinking_budget_state_holder")
_SAMPLING_EPS = 1e-5  # vLLM's: temperatures below it are greedy and divided by 1.0

_pending: tuple[int, torch.Size, torch.Tensor] | None = None  # (data_ptr, shape, lse [rows])
_changed = False  # a processor after the entropy processor wrote into this step's logits
_installed = False
_used = False
# With VLLM_COMPUTE_NANS_IN_LOGITS the runner reads the logits after the sampler, so the
# processed logprobs must not be written over them (set by install()).
_nan_count = False


def _note_first_use() -> None:
    global _used
    _used = True
    log.info("first step whose processed logprobs came from the entropy pass")


def offer(logits: torch.Tensor | None, lse: torch.Tensor | None = None) -> None:
    """This step's logits and their per-row lse ([rows] float32), or None: nothing to
    reuse. The entropy processor calls it every step, so nothing stale survives."""
    global _pending, _changed
    _pending = None if logits is None or lse is None else (
        logits.data_ptr(), logits.shape, lse)
    _changed = False


def note_changed() -> None:
    """A processor running after the entropy processor wrote into this step's logits."""
    global _changed
    _changed = True


def take(logits: torch.Tensor) -> torch.Tensor | None:
    """The lse offered for exactly this tensor this step, if nothing changed it since."""
    global _pending, _changed
    pending, changed = _pending, _changed
    _pending, _changed = None, False
    if pending is None or changed:
        return None
    ptr, shape, lse = pending
    return lse if ptr == logits.data_ptr() and shape == logits.shape else None


def untouched_after_processors(metadata, logprobs_mode: str) -> bool:
    """Whether `Sampler.sample` hands the top-k/top-p sampler the logits exactly as the
    processors left them and asks it for their log-softmax."""
    if logprobs_mode != "processed_logprobs" or not metadata.no_penalties:
        return False
    holder = metadata.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return False
    if metadata.all_greedy:  # vLLM takes the log-softmax of the logits as they are
        return True
    if metadata.top_k is not None or metadata.top_p is not None:
        return False
    temperature = metadata.temperature  # [rows] float32 on the host: no device sync
    if temperature is None or not bool(((temperature == 1.0) | (temperature < _SAMPLING_EPS)).all()):
        return False
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    # min-p with no request using it is a no-op; anything else may write into the logits
    return all(isinstance(p, MinPLogitsProcessor) and getattr(p, "min_p_count", 1) == 0
               for p in metadata.logitsprocs.argmax_invariant)


def usable_lse(logits: torch.Tensor, metadata, logprobs_mode: str) -> torch.Tensor | None:
    """The offered lse, when it is exactly this step's and the sampler would otherwise
    take the log-softmax of these very logits."""
    lse = take(logits)
    return lse if lse is not None and untouched_after_processors(metadata, logprobs_mode) else None


def problems() -> list[str]:
    """Why this vLLM's sampler cannot take the wrapper (empty: it can)."""
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    found = []
    got = tuple(p for p in inspect.signature(Sampler.sample).parameters if p != "self")
    if got != SAMPLE_PARAMS:
        found.append(f"Sampler.sample{got} (expected {SAMPLE_PARAMS})")
    fields = set(getattr(SamplingMetadata, "__dataclass_fields__", {}))
    found += [f"SamplingMetadata.{f} is missing" for f in METADATA_FIELDS if f not in fields]
    return found


def install() -> bool:
    """Wrap `Sampler.sample` once per process; False (and a log line) when this vLLM's
    sampler is not the one the wrapper was written for."""
    global _installed, _nan_count
    if _installed:
        return True
    if found := problems():
        log.warning("processed logprobs keep vLLM's own log-softmax: %s", "; ".join(found))
        return False
    from vllm import envs
    from vllm.v1.sample.sampler import Sampler

    _nan_count = bool(envs.VLLM_COMPUTE_NANS_IN_LOGITS)
    original = Sampler.sample

    def sample(self, logits, sampling_metadata, logprobs_mode_override=None):
        lse = usable_lse(logits, sampling_metadata, logprobs_mode_override or self.logprobs_mode)
        if lse is None:
            return original(self, logits, sampling_metadata, logprobs_mode_override)
        inner = self.topk_topp_sampler
        inner_mode, inner.logprobs_mode = inner.logprobs_mode, "processed_logits"
        try:  # the same draw, handing back the logits instead of their log-softmax
            sampled, processed = original(self, logits, sampling_metadata, "processed_logits")
        finally:
            inner.logprobs_mode = inner_mode
        if processed is not None:  # the logits themselves: [rows, vocab] float32
            if _nan_count:  # vLLM then counts NaNs in the logits after sampling
                processed = processed - lse.unsqueeze(1)
            else:  # nothing reads the logits after sampling: no fresh [rows, vocab] buffer
                processed.sub_(lse.unsqueeze(1))
        if not _used:
            _note_first_use()
        return sampled, processed

    Sampler.sample = sample
    _installed = True
    log.info("processed logprobs reuse the entropy pass's log-normaliser when the "
             "logits reach the sampler unchanged")
    return True

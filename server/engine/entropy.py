"""Shannon entropy of full next-token distributions, and the device buffer it lands in.

Shared by both logits-processor adapters (`processor_v1`, `processor_v2`). Entropy is
computed in float32 on the logits' device over the whole vocabulary, in nats, of the
distribution the processor sees: after bias/penalties, before temperature/top-k/top-p
(i.e. at temperature 1). Nothing here copies to the host per step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

# Every SamplingParams.extra_args key stepzip's processors read starts with this
# (forcing.FORCE_KEY too): the server sets them, and refuses them from clients.
INTERNAL_KEY_PREFIX = "stepzip_"
# SamplingParams.extra_args key carrying a request's entropy key.
EXTRA_ARGS_KEY = "stepzip_entropy_key"


# exp() of anything below this is under 1.8e-35: clamping there keeps exp() out of the
# (very slow on CPUs) denormal range and changes H by < 1e-27 nats even for a 152k vocab.
_LOG_FLOOR = -80.0


def entropy_torch(logits: torch.Tensor) -> torch.Tensor:
    """Reference path. logits: [rows, vocab] any float dtype -> [rows] float32 nats.

    With x' = x - max(x) clamped at _LOG_FLOOR, w = exp(x'), Z = sum(w):
    H = log Z - sum(w * x') / Z. Shifting first keeps the error at float32 epsilon times
    the entropy (< 1e-6 nats vs float64); masked (-inf) logits clamp to the floor and
    contribute nothing measurable, never 0 * inf. NaN or +inf anywhere in a row gives NaN,
    as does a row with no finite logit. Five passes over the logits: the kernels in
    `entropy_cpu` / `entropy_triton` compute the same in one.
    """
    x = logits.float()  # [rows, vocab] float32 (no copy when already float32)
    shifted = (x - x.amax(dim=-1, keepdim=True)).clamp_min_(_LOG_FLOOR)  # [rows, vocab]
    weights = shifted.exp()  # [rows, vocab]
    total = weights.sum(dim=-1)  # [rows]
    return total.log() - torch.linalg.vecdot(weights, shifted) / total  # [rows] float32


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] float32 entropies, by the fastest kernel for the device:
    the fused Triton kernel on CUDA, the Numba kernel on the CPU, else `entropy_torch`."""
    if logits.is_cuda:
        from server.engine import entropy_triton

        if entropy_triton.AVAILABLE:
            return entropy_triton.entropy_triton(logits)
    elif logits.device.type == "cpu":
        from server.engine import entropy_cpu

        if entropy_cpu.AVAILABLE:
            return entropy_cpu.entropy_cpu(logits)
    return entropy_torch(logits)


def warm_up(device: torch.device | str, vocab: int) -> None:
    """Compile the kernel `entropy_from_logits` will use for [*, vocab] float32 logits (what
    both vLLM runners hand processors) on `device` now, so the first keyed request's engine
    step does not stall the batch."""
    entropy_from_logits(torch.zeros(2, max(vocab, 1), device=device))  # [2, vocab] f32


class EntropyStore:
    """Device buffer of per-token entropies: [num_entries + 1, max_len] float32.

    Entries are handed out per request key (the key travels in SamplingParams.extra_args)
    and released when the server fetches them. The last row is a scratch row that absorbs
    writes for rows nobody asked about, so adapters can write without branching on the
    host. A key keeps its entry across preemption/recompute; when entries run out, the
    oldest released-by-engine-but-unfetched entry is evicted (its fetch then reports it).
    Evicted keys are remembered, oldest first, up to `max_evicted` (default: as many as
    entries), so that keys nobody fetches cannot pile up in the worker.
    """

    def __init__(self, num_entries: int, max_len: int, device: torch.device | str,
                 max_evicted: int | None = None):
        self.num_entries = num_entries
        self.max_len = max_len
        self.scratch = num_entries
        self.device = torch.device(device)
        # buf: [entries + scratch, max_len] float32, NaN = never written
        self.buf = torch.full((num_entries + 1, max_len), float("nan"), dtype=torch.float32,
                              device=self.device)
        self._lock = threading.Lock()
        self._entry_of: dict[str, int] = {}
        self._free = list(range(num_entries - 1, -1, -1))
        self._idle: OrderedDict[str, None] = OrderedDict()  # keys the engine let go of
        # Keys whose entry went unfetched, oldest first. Forgetting one is safe: if its
        # request resumes (after preemption) it gets a fresh entry, and a fetch then
        # reports the earlier positions as never written (NaN) instead of None.
        self.evicted: OrderedDict[str, None] = OrderedDict()
        self.max_evicted = num_entries if max_evicted is None else max_evicted
        self.evictions = 0  # entries evicted unfetched since start: reported with fetches

    def entry_for(self, key: str) -> int:
        """The entry of `key`, allocating one (and clearing it) the first time."""
        with self._lock:
            if key in self.evicted:  # its earlier values are gone: let fetch report it
                return self.scratch
            if (entry := self._entry_of.get(key)) is not None:
                self._idle.pop(key, None)
                return entry
            if not self._free:
                if not self._idle:
                    return self.scratch
                victim, _ = self._idle.popitem(last=False)
                self._free.append(self._entry_of.pop(victim))
                self._remember_evicted(victim)
            entry = self._free.pop()
            self._entry_of[key] = entry
        self.buf[entry].fill_(float("nan"))
        return entry

    def _remember_evicted(self, key: str) -> None:
        """Count an eviction and remember its key, forgetting the oldest past the bound.
        The caller holds the lock."""
        self.evictions += 1
        self.evicted[key] = None
        if len(self.evicted) > self.max_evicted:
            self.evicted.popitem(last=False)

    def mark_idle(self, key: str) -> None:
        """The engine removed the request from its batch (finished or preempted)."""
        with self._lock:
            if key in self._entry_of:
                self._idle[key] = None

    def fetch(self, requests: list[tuple[str, int]]) -> dict[str, list[float] | None]:
        """Copy the first n entropies of each key to the host in ONE transfer and release.

        Returns None for a key this store never saw or had to evict.
        """
        with self._lock:
            found = [(key, self._entry_of.get(key), n) for key, n in requests]
        rows = [(key, entry, min(n, self.max_len)) for key, entry, n in found if entry is not None]
        out: dict[str, list[float] | None] = {key: None for key, _ in requests}
        if rows:
            width = max(n for _, _, n in rows)
            index = torch.tensor([entry for _, entry, _ in rows], dtype=torch.long)
            host = self.buf.index_select(0, index.to(self.device))[:, :width].cpu()  # one copy
            for i, (key, _, n) in enumerate(rows):
                out[key] = host[i, :n].tolist()
        self.release([key for key, _ in requests])
        return out

    def release(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                entry = self._entry_of.pop(key, None)
                self._idle.pop(key, None)
                self.evicted.pop(key, None)
                if entry is not None:
                    self._free.append(entry)


_STORE: EntropyStore | None = None


def get_store(num_entries: int, max_len: int, device: torch.device | str) -> EntropyStore:
    """The worker process's one store, shared by the processor and the worker extension."""
    global _STORE
    if _STORE is None:
        _STORE = EntropyStore(num_entries, max_len, device)
    return _STORE


def current_store() -> EntropyStore | None:
    return _STORE

"""Prefill scoring for /v1/score: the teacher-forced entropies of given reasoning (and,
when asked, each given token's logprob) from ONE prefill pass over prompt + reasoning.

The request the engine gets is the prompt followed by all reasoning tokens but the last,
with `prompt_logprobs=0` (so the legacy runner tracks it in `num_prompt_logprobs` and
vLLM skips reading the prefix cache: every reasoning position's hidden state is
computed) and `max_tokens=1`. Reasoning token j is predicted by the hidden state at
position start - 1 + j; the last one's is the final prompt position, so the given ids fit
the model length exactly as teacher forcing's do (prompt + reasoning <= max_model_len).

In the worker, `PrefillScorer` replaces the runner's `_get_prompt_logprobs_dict`
(vLLM 0.32 `GPUModelRunner`, inherited by the CPU runner), which receives every
scheduled position's hidden states. For requests carrying PREFILL_KEY it computes logits
for the reasoning positions only, `chunk_rows` rows at a time ([chunk, vocab] float32 at
most, CHUNK_BYTES), writes each row's entropy (the entropy processor's kernel, of the raw
logits: score requests have no penalties or bias) into the EntropyStore under the
request's key, and with `logprobs` gathers the given token's logprob as vLLM's own
prompt-logprobs path does. Those come back as the request's prompt logprobs with ONE
ROW PER REASONING TOKEN (not per prompt token): `RequestOutput.prompt_logprobs` is then
[None, reasoning token 0's, ...]. Every other request goes to vLLM's own method.

Model Runner V2 has no such method: the engine then teacher-forces (forcing.py).
"""

from __future__ import annotations

import logging

import torch

from server.engine.entropy import current_store, entropy_from_logits

# Under "vllm." so it reaches the handler vLLM configures in its worker process.
log = logging.getLogger("vllm.stepzip.prefill")

# SamplingParams.extra_args key: {"key": entropy key, "start": reasoning's first position,
# "last": the last reasoning token id (not in the engine prompt), "logprobs": bool}.
PREFILL_KEY = "stepzip_prefill"
# Logits materialised per pass: 64 MiB of float32, i.e. 341 rows of a 49,152-token vocab,
# 110 of a 152,064-token one.
CHUNK_BYTES = 64 * 2**20


def prefill_request(key: str, prompt_ids: list[int],
                    token_ids: list[int], logprobs: bool) -> tuple[list[int], dict]:
    """(engine prompt, SamplingParams arguments) that score `token_ids` after
    `prompt_ids` in one prefill. Greedy: the one sampled token is discarded."""
    spec = {"key": key, "start": len(prompt_ids), "last": token_ids[-1],
            "logprobs": logprobs}
    return prompt_ids + token_ids[:-1], {
        "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False,
        "skip_reading_prefix_cache": True, "extra_args": {PREFILL_KEY: spec}}


def given_logprobs(prompt_logprobs, n: int) -> list:
    """The per-token logprob dicts of a prefill-scored request's output (see above)."""
    rows = list(prompt_logprobs or [])[1:]
    if len(rows) != n:
        raise RuntimeError(f"the engine returned {len(rows)} logprobs for {n} given tokens")
    return rows


def _spec(request, vocab: int) -> dict | None:
    """The request's prefill spec when it is well-formed for its prompt, else None (then
    vLLM computes its prompt logprobs itself)."""
    params = request.sampling_params if request is not None else None
    spec = (params.extra_args or {}).get(PREFILL_KEY) if params is not None else None
    prompt = request.prompt_token_ids if spec is not None else None
    if (not isinstance(spec, dict) or prompt is None or not isinstance(spec.get("key"), str)
            or not isinstance(spec.get("start"), int) or not isinstance(spec.get("last"), int)
            or not isinstance(spec.get("logprobs"), bool)):
        return None
    if not 1 <= spec["start"] <= len(prompt) or not 0 <= spec["last"] < vocab:
        return None
    return spec


class PrefillScorer:
    """Stands in for one legacy runner's `_get_prompt_logprobs_dict` (same arguments)."""

    def __init__(self, runner, store):
        self.runner = runner
        self.store = store
        self.original = runner._get_prompt_logprobs_dict
        self.vocab = runner.model_config.get_vocab_size()
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * self.vocab))

    def __call__(self, hidden_states: torch.Tensor,
                 num_scheduled_tokens: dict[str, int]) -> dict:
        pending = self.runner.num_prompt_logprobs  # req id -> top-k, prefills in progress
        if not pending:  # every decode-only step: no lookups at all
            return self.original(hidden_states, num_scheduled_tokens)
        ours = {}
        for req_id in list(pending):
            if (spec := _spec(self.runner.requests.get(req_id), self.vocab)) is not None:
                ours[req_id] = (spec, pending.pop(req_id))
        out = self.original(hidden_states, num_scheduled_tokens)
        finished = False
        for req_id, (spec, top_k) in ours.items():
            done, tensors = self._score(req_id, spec, hidden_states, num_scheduled_tokens)
            if not done:
                pending[req_id] = top_k  # more chunks to come
            elif tensors is not None:
                out[req_id] = tensors
                finished = True
        if finished:  # the non-blocking device-to-host copies of the logprobs
            self.runner._sync_device()
        return out

    def _score(self, req_id: str, spec: dict, hidden_states: torch.Tensor,
               num_scheduled_tokens: dict[str, int]):
        """Score this step's reasoning positions of one request. -> (prefill complete,
        its logprobs tensors when complete and asked for)."""
        from vllm.v1.outputs import LogprobsTensors

        runner = self.runner
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted during prefill; it is scheduled again later
            return False, None
        request = runner.requests[req_id]
        prompt = request.prompt_token_ids
        first = request.num_computed_tokens  # position of this step's first row
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        base = spec["start"] - 1  # position predicting reasoning token 0
        lo, hi = max(first, base), first + num_tokens  # positions scored in this step
        complete = hi >= len(prompt)
        entry = self.store.entry_for(spec["key"])
        acc = None
        if spec["logprobs"]:
            acc = request.in_progress_prompt_logprobs_cpu
            if acc is None:  # [reasoning tokens, 1]: the given token's id, logprob, rank
                acc = LogprobsTensors.empty_cpu(len(prompt) - base, 1)
                request.in_progress_prompt_logprobs_cpu = acc
            # position p predicts prompt[p + 1]; the final position, the held-back last id
            targets = torch.tensor(prompt[lo + 1:hi + 1] + ([spec["last"]] if complete else []),
                                   dtype=torch.long).to(hidden_states.device,
                                                        non_blocking=True)  # [hi - lo]
        for a in range(lo, hi, self.chunk_rows):
            b = min(a + self.chunk_rows, hi)
            rows = hidden_states[offset + a - first:offset + b - first]  # [b - a, hidden]
            logits = runner.model.compute_logits(rows).float()  # [b - a, vocab] float32
            self.store.buf[entry, a - base:b - base].copy_(entropy_from_logits(logits))
            if acc is not None:
                ids, logprobs, ranks, *_ = runner.sampler.gather_logprobs(
                    runner.sampler.compute_logprobs(logits), 0, targets[a - lo:b - lo])
                acc.logprob_token_ids[a - base:b - base].copy_(ids, non_blocking=True)
                acc.logprobs[a - base:b - base].copy_(logprobs, non_blocking=True)
                acc.selected_token_ranks[a - base:b - base].copy_(ranks, non_blocking=True)
        if not complete:
            return False, None
        self.store.mark_idle(spec["key"])  # evictable if never fetched, as the processor's
        request.in_progress_prompt_logprobs_cpu = None
        return True, acc


# What PrefillScorer reads of a built runner (instance state, so checked in the worker;
# server/engine/compat.py checks the methods and classes at start-up).
RUNNER_ATTRIBUTES = ("num_prompt_logprobs", "requests", "input_batch.req_id_to_index",
                     "query_start_loc.np", "model.compute_logits", "sampler.compute_logprobs",
                     "sampler.gather_logprobs", "model_config.get_vocab_size")


def _has(obj, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def install(worker) -> list[str]:
    """Put a PrefillScorer in front of `worker`'s runner. -> problems (empty: installed)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = getattr(worker, "model_runner", None)
    if not isinstance(runner, GPUModelRunner):  # Model Runner V2 classes are not
        return [f"{type(runner).__name__} is not vLLM's legacy model runner"]
    store = current_store()
    if store is None:
        return ["no entropy store in this worker (the entropy processor is not loaded)"]
    problems = [f"{type(runner).__name__}.{path} is missing" for path in RUNNER_ATTRIBUTES
                if not _has(runner, path)]
    if problems:
        return problems
    if not isinstance(runner._get_prompt_logprobs_dict, PrefillScorer):
        runner._get_prompt_logprobs_dict = PrefillScorer(runner, store)
    scorer = runner._get_prompt_logprobs_dict
    log.info("prefill scoring on %s: %d logits rows per pass", type(runner).__name__,
             scorer.chunk_rows)
    return []

"""The sampler's processed logprobs from the entropy pass's log-normaliser
(server/engine/logprobs_reuse.py), driven through vLLM's real `Sampler` on the CPU with
the entropy processor in its processor list: the same tokens as vLLM's own path, the
same logprobs within float32 rounding, and vLLM's own path whenever anything after the
entropy processor could have changed the logits."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessors
from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler
from vllm_batch import fake_vllm_config, random_logits

import server.engine.entropy as entropy_mod
from server.engine import logprobs_reuse
from server.engine.entropy import EXTRA_ARGS_KEY, entropy_torch
from server.engine.forcing import FORCE_KEY, ForcingProcessorV1
from server.engine.processor_v1 import EntropyProcessorV1

ROWS = 3
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """A fresh entropy store, and vLLM's Sampler.sample restored after each test."""
    entropy_mod._STORE = None
    monkeypatch.setattr(Sampler, "sample", Sampler.sample)
    monkeypatch.setattr(logprobs_reuse, "_installed", False)
    logprobs_reuse.offer(None)
    yield
    entropy_mod._STORE = None


@pytest.fixture
def taken(monkeypatch) -> list[bool]:
    """One entry per sampler step (the wrapper stays installed once a processor put it
    there): whether the step used an offered log-normaliser."""
    seen: list[bool] = []
    real = logprobs_reuse.usable_lse

    def spy(*args):
        lse = real(*args)
        seen.append(lse is not None)
        return lse

    monkeypatch.setattr(logprobs_reuse, "usable_lse", spy)
    return seen


def processors(reuse: bool, forced: dict[int, list[int]] | None = None):
    config = fake_vllm_config(max_num_seqs=8)
    config.model_config.logprobs_mode = "processed_logprobs" if reuse else "raw_logprobs"
    entropy = EntropyProcessorV1(config, CPU, False)
    forcing = ForcingProcessorV1(config, CPU, False)
    added = []
    for row in range(ROWS):
        extra = {EXTRA_ARGS_KEY: f"k{row}"}
        if forced and row in forced:
            extra[FORCE_KEY] = forced[row]
        added.append((row, SamplingParams(max_tokens=8, extra_args=extra), [1, 2], []))
    update = BatchUpdate(batch_size=ROWS, removed=[], moved=[], added=added)
    entropy.update_state(update)
    forcing.update_state(update)
    min_p = MinPLogitsProcessor(config, CPU, False)
    return LogitsProcessors([min_p, entropy, forcing]), entropy


def metadata(procs, temperatures, *, top_p=None, repetition=1.0) -> SamplingMetadata:
    t = torch.tensor(temperatures, dtype=torch.float32)  # [rows]
    greedy = t < 1e-5
    return SamplingMetadata(
        temperature=None if bool(greedy.all()) else t, all_greedy=bool(greedy.all()),
        all_random=bool((~greedy).all()),
        top_p=None if top_p is None else torch.full((ROWS,), top_p), top_k=None,
        generators={}, max_num_logprobs=-1, no_penalties=repetition == 1.0,
        prompt_token_ids=torch.tensor([[1, 2]] * ROWS),
        frequency_penalties=torch.zeros(ROWS), presence_penalties=torch.zeros(ROWS),
        repetition_penalties=torch.full((ROWS,), repetition),
        output_token_ids=[[] for _ in range(ROWS)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=procs)


def step(logits, temperatures, reuse: bool, seed: int = 5, forced=None, **kw):
    """(tokens [rows], processed logprobs [rows, vocab], entropies) of one sampler step."""
    procs, entropy = processors(reuse, forced)
    if reuse:
        assert entropy.reuse  # installed on the CPU
    torch.manual_seed(seed)  # the CPU sampler draws its per-row seeds from torch's RNG
    out = Sampler(logprobs_mode="processed_logprobs")(
        logits.clone(), metadata(procs, temperatures, **kw))
    got = entropy.store.fetch([(f"k{r}", 1) for r in range(ROWS)])
    return out.sampled_token_ids, out.logprobs_tensors.logprobs, got


@pytest.mark.parametrize("temperatures", [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
                         ids=["random", "mixed greedy", "all greedy"])
def test_unchanged_logits_reuse_the_entropy_pass(temperatures, taken):
    logits = random_logits(ROWS, torch.Generator().manual_seed(1))  # [rows, vocab], some -inf
    ours, ours_lp, ours_h = step(logits, temperatures, reuse=True)
    theirs, theirs_lp, theirs_h = step(logits, temperatures, reuse=False)
    assert taken == [True, False]  # the second step offered nothing
    assert torch.equal(ours, theirs)
    finite = torch.isfinite(theirs_lp)
    assert torch.equal(finite, torch.isfinite(ours_lp))
    assert (ours_lp[finite] - theirs_lp[finite]).abs().max() <= 1e-5  # float32 rounding
    assert ours_h == theirs_h
    for r in range(ROWS):
        assert ours_h[f"k{r}"][0] == pytest.approx(float(entropy_torch(logits[r:r + 1])), abs=1e-5)


@pytest.mark.parametrize("case", [
    {"temperatures": [0.7, 1.0, 1.0]},
    {"temperatures": [1.0, 1.0, 1.0], "top_p": 0.9},
    {"temperatures": [1.0, 1.0, 1.0], "repetition": 1.3},
    {"temperatures": [0.0, 0.0, 0.0], "forced": {1: [7, 8]}},
], ids=["temperature", "top-p", "penalties", "forced row"])
def test_anything_after_the_entropy_processor_keeps_vllms_log_softmax(case, taken):
    logits = random_logits(ROWS, torch.Generator().manual_seed(2))
    ours, ours_lp, _ = step(logits, reuse=True, **case)
    theirs, theirs_lp, _ = step(logits, reuse=False, **case)
    assert taken == [False, False]
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_lp, theirs_lp)  # vLLM's own path, bit for bit


def test_a_stale_offer_is_never_used(taken):
    logits = random_logits(ROWS, torch.Generator().manual_seed(3))
    logprobs_reuse.offer(logits, torch.zeros(ROWS))
    assert logprobs_reuse.take(logits.clone()) is None  # another tensor
    logprobs_reuse.offer(logits, torch.zeros(ROWS))
    logprobs_reuse.note_changed()
    assert logprobs_reuse.take(logits) is None
    logprobs_reuse.offer(logits, torch.zeros(ROWS))
    assert logprobs_reuse.take(logits) is not None
    assert logprobs_reuse.take(logits) is None  # once


def test_the_sampler_interface_is_the_one_wrapped():
    assert logprobs_reuse.problems() == []


@pytest.mark.parametrize("nan_count", [False, True])
def test_logprobs_overwrite_the_logits_unless_vllm_counts_nans_after(nan_count, monkeypatch):
    procs, entropy = processors(reuse=True)
    assert entropy.reuse
    monkeypatch.setattr(logprobs_reuse, "_nan_count", nan_count)
    logits = random_logits(ROWS, torch.Generator().manual_seed(4))
    given = logits.clone()
    out = Sampler(logprobs_mode="processed_logprobs")(given, metadata(procs, [1.0] * ROWS))
    logprobs = out.logprobs_tensors.logprobs
    assert (logprobs.data_ptr() == given.data_ptr()) is not nan_count
    assert torch.equal(given, logits) is nan_count  # the logits survive when read later
    want = logits.log_softmax(dim=-1)
    finite = torch.isfinite(want)
    assert (logprobs[finite] - want[finite]).abs().max() <= 1e-5

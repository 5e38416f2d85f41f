"""Prefill scoring (server/engine/prefill.py) against a stand-in legacy runner: the
entropies written and the given tokens' logprobs must be those of the logits at each
reasoning position, whether the prefill comes in one step or in chunks, whatever the
chunk size; requests without the key go to vLLM's own method untouched."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.outputs import LogprobsTensors
from vllm.v1.sample.sampler import Sampler
from vllm.v1.worker.gpu_input_batch import CachedRequestState

import server.engine.entropy as entropy_mod
from server.engine import prefill
from server.engine.compat import prefill_problems
from server.engine.entropy import EntropyStore, entropy_torch
from server.engine.prefill import PREFILL_KEY, PrefillScorer, given_logprobs, prefill_request

VOCAB, HIDDEN = 64, 8


class Runner:
    """The parts of vLLM 0.32's GPUModelRunner that PrefillScorer reads."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.head = torch.randn(HIDDEN, VOCAB, generator=gen) * 3  # [hidden, vocab]
        self.model = SimpleNamespace(compute_logits=lambda h: h @ self.head)
        self.model_config = SimpleNamespace(get_vocab_size=lambda: VOCAB)
        self.sampler = Sampler
        self.num_prompt_logprobs: dict[str, int] = {}
        self.requests: dict[str, CachedRequestState] = {}
        self.input_batch = SimpleNamespace(req_id_to_index={})
        self.query_start_loc = SimpleNamespace(np=np.zeros(8, dtype=np.int32))
        self.original_calls: list[list[str]] = []
        self.synced = 0

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        self.original_calls.append(sorted(self.num_prompt_logprobs))
        return {req_id: "vllm's" for req_id in self.num_prompt_logprobs}

    def _sync_device(self):
        self.synced += 1

    def add(self, req_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.requests[req_id] = CachedRequestState(
            req_id=req_id, prompt_token_ids=prompt, mm_features=[], sampling_params=params,
            generator=None, block_ids=([],), num_computed_tokens=0, output_token_ids=[])
        self.num_prompt_logprobs[req_id] = params.prompt_logprobs

    def step(self, scorer, scheduled: dict[str, int], hidden: dict[str, torch.Tensor]):
        """One engine step: `scheduled` tokens of each request, rows laid out in order."""
        self.input_batch.req_id_to_index = {r: i for i, r in enumerate(scheduled)}
        self.query_start_loc.np[1:len(scheduled) + 1] = np.cumsum(list(scheduled.values()))
        rows = [hidden[r][self.requests[r].num_computed_tokens:][:n]
                for r, n in scheduled.items()]
        out = scorer(torch.cat(rows), dict(scheduled))  # [tokens, hidden]
        for r, n in scheduled.items():
            self.requests[r].num_computed_tokens += n
        return out


def expected(runner, hidden: torch.Tensor, start: int, ids: list[int]):
    """Entropy and given-token logprob of each reasoning token, from the full logits."""
    logits = runner.model.compute_logits(hidden[start - 1:start - 1 + len(ids)])
    logp = torch.log_softmax(logits, dim=-1)
    return entropy_torch(logits), logp.gather(1, torch.tensor(ids)[:, None])[:, 0]


@pytest.fixture
def store():
    entropy_mod._STORE = None
    yield EntropyStore(num_entries=4, max_len=64, device="cpu")
    entropy_mod._STORE = None


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
@pytest.mark.parametrize("steps", [[40], [5, 9, 26], [12, 28]])
def test_entropies_and_logprobs_of_every_reasoning_position(store, monkeypatch, chunk_rows,
                                                            steps):
    """Prompt of 12 tokens, 29 reasoning tokens (28 in the engine prompt, the last held
    back); prefilled in one step or in chunks that start inside the prompt or not."""
    monkeypatch.setattr(prefill, "CHUNK_BYTES", chunk_rows * 4 * VOCAB)
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(VOCAB, (12,), generator=gen).tolist()
    ids = torch.randint(VOCAB, (29,), generator=gen).tolist()
    engine_prompt, kwargs = prefill_request("k1", prompt_ids, ids, logprobs=True)
    assert engine_prompt == prompt_ids + ids[:-1] and sum(steps) == len(engine_prompt)
    runner = Runner()
    runner.add("r1", engine_prompt, SamplingParams(**kwargs))
    hidden = torch.randn(len(engine_prompt), HIDDEN, generator=gen)  # [prompt, hidden]
    scorer = PrefillScorer(runner, store)
    assert scorer.chunk_rows == chunk_rows
    outs = [runner.step(scorer, {"r1": n}, {"r1": hidden}) for n in steps]
    assert all("r1" not in out for out in outs[:-1])  # only the completing step returns
    tensors = outs[-1]["r1"]
    assert isinstance(tensors, LogprobsTensors) and runner.synced == 1
    assert "r1" not in runner.num_prompt_logprobs  # done: vLLM will not see it again
    want_h, want_lp = expected(runner, hidden, len(prompt_ids), ids)
    got_h = torch.tensor(store.fetch([("k1", len(ids))])["k1"])
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(tensors.logprobs[:, 0], want_lp, atol=1e-5, rtol=0)
    assert tensors.logprob_token_ids[:, 0].tolist() == ids
    assert all(runner.original_calls[i] == [] for i in range(len(steps)))


def test_one_given_token_is_scored_at_the_last_prompt_position(store):
    runner = Runner()
    gen = torch.Generator().manual_seed(3)
    engine_prompt, kwargs = prefill_request("k3", [1, 2, 3], [9], logprobs=True)
    assert engine_prompt == [1, 2, 3]
    runner.add("r", engine_prompt, SamplingParams(**kwargs))
    hidden = torch.randn(3, HIDDEN, generator=gen)  # [prompt, hidden]
    tensors = runner.step(PrefillScorer(runner, store), {"r": 3}, {"r": hidden})["r"]
    want_h, want_lp = expected(runner, hidden, 3, [9])
    torch.testing.assert_close(torch.tensor(store.fetch([("k3", 1)])["k3"]), want_h,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(tensors.logprobs[:, 0], want_lp, atol=1e-5, rtol=0)


def test_other_requests_go_to_vllm_and_no_logprobs_returns_nothing(store):
    runner = Runner()
    gen = torch.Generator().manual_seed(2)
    engine_prompt, kwargs = prefill_request("k2", [1, 2, 3], [4, 5, 6], logprobs=False)
    runner.add("ours", engine_prompt, SamplingParams(**kwargs))
    runner.add("theirs", [7, 8, 9, 10], SamplingParams(max_tokens=1, prompt_logprobs=2))
    hidden = {"ours": torch.randn(5, HIDDEN, generator=gen),
              "theirs": torch.randn(4, HIDDEN, generator=gen)}
    scorer = PrefillScorer(runner, store)
    out = runner.step(scorer, {"theirs": 4, "ours": 5}, hidden)
    assert out == {"theirs": "vllm's"} and runner.original_calls == [["theirs"]]
    assert runner.synced == 0
    want_h, _ = expected(runner, hidden["ours"], 3, [4, 5, 6])
    torch.testing.assert_close(torch.tensor(store.fetch([("k2", 3)])["k2"]), want_h,
                               atol=1e-5, rtol=0)


def test_decode_steps_touch_nothing(store):
    runner = Runner()
    scorer = PrefillScorer(runner, store)
    assert scorer(torch.zeros(3, HIDDEN), {"a": 1, "b": 1, "c": 1}) == {}
    assert runner.original_calls == [[]]


@pytest.mark.parametrize("spec", [
    "not a dict", {"key": "k", "start": 0, "last": 1, "logprobs": False},
    {"key": "k", "start": 99, "last": 1, "logprobs": False},
    {"key": "k", "start": 2, "last": VOCAB, "logprobs": False},
    {"key": 5, "start": 2, "last": 1, "logprobs": False},
    {"key": "k", "start": 2, "last": 1}])
def test_a_malformed_spec_is_left_to_vllm(store, spec):
    runner = Runner()
    runner.add("r", [1, 2, 3, 4], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                 extra_args={PREFILL_KEY: spec}))
    out = runner.step(PrefillScorer(runner, store), {"r": 4},
                      {"r": torch.zeros(4, HIDDEN)})
    assert out == {"r": "vllm's"}


def test_given_logprobs_are_the_rows_after_vllms_leading_none():
    assert given_logprobs([None, {4: "a"}, {5: "b"}], 2) == [{4: "a"}, {5: "b"}]
    with pytest.raises(RuntimeError):
        given_logprobs([None, {4: "a"}], 2)


def test_this_vllm_has_what_prefill_scoring_uses():
    assert prefill_problems(use_v2=False) == []
    assert prefill_problems(use_v2=True)
    assert prefill_problems(use_v2=False, version="0.99.0") == ["vLLM 0.99.0 is not a tested line"]


def test_install_names_what_a_runner_lacks(store, monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class Legacy(GPUModelRunner, Runner):
        def __init__(self):
            Runner.__init__(self)

    monkeypatch.setattr(entropy_mod, "_STORE", store)
    runner = Legacy()
    assert prefill.install(SimpleNamespace(model_runner=runner)) == []
    assert isinstance(runner._get_prompt_logprobs_dict, PrefillScorer)
    scorer = runner._get_prompt_logprobs_dict
    assert prefill.install(SimpleNamespace(model_runner=runner)) == []
    assert runner._get_prompt_logprobs_dict is scorer  # installed once
    broken = Legacy()
    broken.model = SimpleNamespace()
    assert prefill.install(SimpleNamespace(model_runner=broken)) == [
        "Legacy.model.compute_logits is missing"]
    assert prefill.install(SimpleNamespace(model_runner=Runner())) == [
        "Runner is not vLLM's legacy model runner"]

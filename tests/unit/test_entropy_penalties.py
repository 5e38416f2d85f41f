"""Penalised requests: the legacy runner's processor reports the entropy of the same
distribution Model Runner V2's sees (after presence/frequency/repetition penalties).

V2 runs custom processors after its penalty kernel; the legacy runner runs them before
its penalties, so `EntropyProcessorV1` applies vLLM's penalties to a copy. The oracle
(tests/penalty_oracle.py) is V2's penalty kernel written out in float64.
"""

from __future__ import annotations

import pytest
import torch
from penalty_oracle import entropy64, v2_penalised
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm_batch import make_v1, random_logits

import server.engine.entropy as entropy_mod
from server.engine.entropy import EXTRA_ARGS_KEY


@pytest.fixture(autouse=True)
def fresh_store():
    entropy_mod._STORE = None
    yield
    entropy_mod._STORE = None


def test_penalised_rows_get_the_entropy_after_penalties_unpenalised_rows_before():
    b = make_v1(max_num_seqs=4)
    proc = b.proc
    pen = {"presence_penalty": 0.7, "frequency_penalty": 0.3, "repetition_penalty": 1.6}
    prompts = {"p": [3, 4, 5, 6], "n": [3, 4, 7]}
    outs: dict[str, list[int]] = {"p": [], "n": []}
    sps = {"p": SamplingParams(max_tokens=64, extra_args={EXTRA_ARGS_KEY: "p"}, **pen),
           "n": SamplingParams(max_tokens=64, extra_args={EXTRA_ARGS_KEY: "n"})}
    # row 0: unpenalised, row 1: penalised (rows and dict order differ on purpose)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (1, sps["p"], prompts["p"], outs["p"]), (0, sps["n"], prompts["n"], outs["n"])]))
    gen = torch.Generator().manual_seed(3)
    expected: dict[str, list[float]] = {"p": [], "n": []}
    unpenalised_p: list[float] = []
    # outputs that repeat prompt tokens and themselves, so every penalty term acts
    for token in (4, 4, 9, 3, 9, 9):
        logits = random_logits(2, gen)
        # V2 sees the penalised row 1; row 0 has no penalties
        expected["p"].append(entropy64(v2_penalised(logits[1], prompts["p"], outs["p"],
                                                    0.7, 0.3, 1.6)))
        unpenalised_p.append(entropy64(logits[1]))
        expected["n"].append(entropy64(logits[0]))
        proc.apply(logits)
        outs["p"].append(token)
        outs["n"].append(token)
    got = proc.store.fetch([("p", 6), ("n", 6)])
    assert got["p"] == pytest.approx(expected["p"], abs=1e-5)
    assert got["n"] == pytest.approx(expected["n"], abs=1e-5)
    # the test can tell the two orders apart
    assert max(abs(a - b) for a, b in zip(expected["p"], unpenalised_p)) > 0.05

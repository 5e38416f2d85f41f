"""n > 1 with the `stepzip` object is one engine request: vLLM's ParentRequest builds the
children, and each child carries its own entropy key (server/engine/client.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.parallel_sampling import ParentRequest

from server.engine.client import child_key, install_child_keys
from server.engine.entropy import EXTRA_ARGS_KEY


def children(params: SamplingParams) -> list[SamplingParams]:
    install_child_keys()
    parent = ParentRequest(SimpleNamespace(request_id="r", external_req_id="r",
                                           params=params))
    return [parent.get_child_info(i)[1] for i in range(params.n)]


@pytest.mark.parametrize("seed", [None, 7])
def test_each_child_gets_its_own_key_and_vllms_seed(seed):
    params = SamplingParams(n=4, temperature=1.0, seed=seed,
                            extra_args={EXTRA_ARGS_KEY: "sz-k", "other": 1})
    kids = children(params)
    assert [c.extra_args[EXTRA_ARGS_KEY] for c in kids] == [f"sz-k#{i}" for i in range(4)]
    assert all(c.extra_args["other"] == 1 and c.n == 1 for c in kids)
    assert [c.seed for c in kids] == ([None] * 4 if seed is None else [7, 8, 9, 10])
    assert params.extra_args[EXTRA_ARGS_KEY] == "sz-k"  # the parent's is untouched


def test_requests_without_a_key_are_vllms_own():
    params = SamplingParams(n=3, temperature=1.0)
    kids = children(params)
    assert all(not (c.extra_args or {}).get(EXTRA_ARGS_KEY) for c in kids)
    assert kids[0] is kids[1]  # vLLM's cached clone, as before


def test_installing_twice_wraps_once():
    install_child_keys()
    install_child_keys()
    kids = children(SamplingParams(n=2, temperature=1.0, extra_args={EXTRA_ARGS_KEY: "k"}))
    assert [c.extra_args[EXTRA_ARGS_KEY] for c in kids] == ["k#0", "k#1"]


def test_one_sample_keeps_the_key():
    assert child_key("k", 1, 0) == "k" and child_key("k", 3, 2) == "k#2"

"""Clients may not send stepzip's engine-internal `SamplingParams.extra_args` keys (they
would force the emitted tokens, or claim entries of the worker's entropy store)."""

from __future__ import annotations

import pytest

from server.engine.entropy import EXTRA_ARGS_KEY, INTERNAL_KEY_PREFIX
from server.engine.forcing import FORCE_KEY
from server.errors import ApiError
from server.services.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    _refuse_internal_keys,
)


def test_every_key_the_processors_read_is_in_the_refused_namespace():
    assert EXTRA_ARGS_KEY.startswith(INTERNAL_KEY_PREFIX)
    assert FORCE_KEY.startswith(INTERNAL_KEY_PREFIX)


@pytest.mark.parametrize("key", [FORCE_KEY, EXTRA_ARGS_KEY, "stepzip_anything"])
@pytest.mark.parametrize("request_of", [
    lambda xargs: CompletionRequest(model="m", prompt="hi", vllm_xargs=xargs),
    lambda xargs: ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                        vllm_xargs=xargs),
], ids=["completion", "chat"])
def test_internal_keys_are_refused_naming_the_field(request_of, key):
    with pytest.raises(ApiError) as refused:
        _refuse_internal_keys(request_of({"session_id": "s", key: [1, 2]}))
    assert refused.value.field == f"vllm_xargs.{key}"
    assert refused.value.status == 422  # rendered 400 on vLLM's routes


def test_other_keys_pass():
    _refuse_internal_keys(CompletionRequest(model="m", prompt="hi",
                                            vllm_xargs={"session_id": "s", "Stepzip": 1}))
    _refuse_internal_keys(CompletionRequest(model="m", prompt="hi"))

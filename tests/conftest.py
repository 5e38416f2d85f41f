"""Shared fixtures. The default model is converted once into the user cache (no hub access)."""

from __future__ import annotations

import os

import pytest

# Nothing in the tests may reach a model hub; child servers inherit this.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir():
    """The prepared embedded SmolLM2-135M-Instruct folder (converted on first use, ~30 s)."""
    from stepzip.modelcache import prepare_default_model

    return prepare_default_model(log=lambda _msg: None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)

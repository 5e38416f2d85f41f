"""The embedded default model: converted once, idempotent, loadable with its chat template."""

from __future__ import annotations

import subprocess
import sys

from stepzip.modelcache import is_prepared, prepare_default_model, resolve_model


def test_prepared_folder_loads_with_tokenizer_and_chat_template(default_model_dir,
                                                                smollm2_tokenizer):
    from transformers import AutoConfig

    assert is_prepared(default_model_dir)
    assert (default_model_dir / "model.safetensors").stat().st_size > 200e6
    config = AutoConfig.from_pretrained(default_model_dir)
    assert config.architectures == ["LlamaForCausalLM"] and config.vocab_size == 49152
    assert smollm2_tokenizer.chat_template
    rendered = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_second_prepare_does_nothing_and_says_so(default_model_dir):
    messages: list[str] = []
    again = prepare_default_model(log=messages.append)
    assert again == default_model_dir
    assert messages == [f"default model already prepared at {default_model_dir} (nothing to do)"]
    assert resolve_model("default") == str(default_model_dir)
    assert resolve_model("org/other-model") == "org/other-model"


def test_cli_prepare_is_idempotent(default_model_dir):
    out = subprocess.run([sys.executable, "-m", "clients.cli", "model", "prepare"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "nothing to do" in out.stdout

"""SFT stage and model helpers with a tiny random Llama (no engine): the [SKIP] token,
completion-only loss, LoRA merge, servable export."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trainer.config import SftRunConfig
from trainer.modeling import (
    META_FILE,
    add_skip_token,
    check_skip_token,
    export_policy,
    policy_state_dict,
)


def _tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def base_dir(tmp_path, tok):
    folder = tmp_path / "base"
    _tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_skip_is_one_normal_token_that_survives_skip_special_decoding(tok) -> None:
    model = _tiny_llama(len(tok))
    pieces = tok.encode("[SKIP]", add_special_tokens=False)
    skip_id = add_skip_token(tok, model, "[SKIP]")
    assert skip_id == len(tok) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()  # still tied
    text = "a\n[SKIP]\n[SKIP]\nb"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(skip_id) == 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[skip_id], emb[pieces].mean(dim=0))
    check_skip_token(tok, "[SKIP]", skip_id)
    # Idempotent: a second call adds nothing.
    assert add_skip_token(tok, model, "[SKIP]") == skip_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_special_skip_vanishes_from_decoded_text(tok) -> None:
    model = _tiny_llama(len(tok))
    skip_id = add_skip_token(tok, model, "[SKIP]", special=True)
    ids = tok.encode("a\n[SKIP]\nb", add_special_tokens=False)
    assert skip_id in ids and "[SKIP]" not in tok.decode(ids, skip_special_tokens=True)


def test_vocab_padding_is_opt_in(tok) -> None:
    model = _tiny_llama(len(tok))
    add_skip_token(tok, model, "[SKIP]", pad_to_multiple_of=64)
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0]


def test_export_is_servable_and_drops_the_tied_head(tmp_path, tok) -> None:
    from safetensors import safe_open

    model = _tiny_llama(len(tok))
    folder = export_policy(model, tmp_path / "out", dtype=torch.bfloat16, tokenizer=tok)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["vocab_size"] == len(tok)
    assert (folder / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.tmp*"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.allclose(reloaded.model.layers[0].mlp.up_proj.weight,
                          model.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float())


def test_peft_policy_exports_merged_weights_under_base_names(tok) -> None:
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(len(tok))
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                 init_lora_weights=False))
    _, state = policy_state_dict(peft_model)
    assert set(state) == set(reference)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(state[q], reference[q])  # the adapter is merged in
    # ...into fresh tensors: the live model's frozen weights stay bit-identical, so
    # pushing after every step cannot drift them.
    frozen = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(frozen, reference[q])
    _, again = policy_state_dict(peft_model)
    assert torch.equal(again[q], state[q])
    x = torch.randn(2, base.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(peft_model.get_base_model().model.layers[0].self_attn.q_proj(x),
                              x @ state[q].T, atol=1e-5)


def _pairs(tmp_path, tok, n=4):
    from stepzip.prompts import style_for

    style = style_for(tok)
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"p{i}", "prompt": style.reasoning_prompt(tok, f"What is {i} + 1?"),
                "completion": f"{i} plus one.\n[SKIP]\n[SKIP]\n</think>\n\nThe answer is "
                              f"{i + 1}.",
                "delimiter": "\n", "marker": "[SKIP]", "think_close": "</think>"}) + "\n")
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_sft_trains_and_saves_a_servable_folder(tmp_path, tok, base_dir, lora) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.sft import run_sft

    cfg = SftRunConfig(model=str(base_dir), data=str(_pairs(tmp_path, tok)),
                       output_dir=str(tmp_path / "sft"), max_steps=2, batch_size=2,
                       grad_accum=1, learning_rate=1e-2, logging_steps=1, dtype="float32",
                       max_length=256, lora=lora, lora_r=4, lora_alpha=8)
    summary = run_sft(cfg, log=lambda m: None)
    out = tmp_path / "sft"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["steps"] == 2 and meta["delimiter"] == "\n" and meta["marker"] == "[SKIP]"
    assert summary["skip_token_id"] == len(tok)  # the base tokenizer had no [SKIP]
    new_tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(new_tok) == len(tok) + 1
    assert new_tok.encode("[SKIP]", add_special_tokens=False) == [meta["skip_token_id"]]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    changed = not torch.allclose(model.state_dict()[name], base.state_dict()[name])
    assert changed  # trained (and, with LoRA, merged)
    emb, base_emb = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    pieces = tok.encode("[SKIP]", add_special_tokens=False)
    skip_row_init = base_emb[pieces].mean(dim=0)
    assert not torch.allclose(emb[meta["skip_token_id"]], skip_row_init)  # the marker learnt
    if lora:  # only the marker's row of the embedding moved
        assert torch.equal(emb[:base_emb.shape[0]], base_emb)
    assert not any(k.startswith("base_model") or "lora_" in k for k in model.state_dict())


def test_sft_masks_the_prompt(tmp_path, tok, base_dir) -> None:
    """TRL's prompt-completion path: loss only on completion tokens (+ EOS)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _tiny_llama(len(tok))
    add_skip_token(tok, model, "[SKIP]")
    rows = [json.loads(line) for line in _pairs(tmp_path, tok, 2).read_text().splitlines()]
    trainer = SFTTrainer(model=model, processing_class=tok,
                         train_dataset=Dataset.from_list(
                             [{"prompt": r["prompt"], "completion": r["completion"]}
                              for r in rows]),
                         args=SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False,
                                        completion_only_loss=True, report_to="none",
                                        max_steps=1))
    example = trainer.train_dataset[0]
    prompt_len = len(tok.encode(rows[0]["prompt"], add_special_tokens=False))
    # TRL folds the completion mask into the labels (-100 = no loss).
    mask = [int(label != -100) for label in example["labels"]]
    assert sum(mask[:prompt_len]) == 0 and all(mask[prompt_len:])
    completion = tok.decode([t for t, m in zip(example["input_ids"], mask) if m])
    assert completion == rows[0]["completion"] + tok.eos_token

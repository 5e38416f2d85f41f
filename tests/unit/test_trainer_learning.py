"""GRPO learns in the rewarded direction: the trainer the run builds (`build_trainer`:
the objective, LoRA, the reward functions training calls), on a task where it must.

A tiny random Llama over an 8-word vocabulary ("[SKIP]" one of them; steps are cut at
spaces) samples completions with TRL's own generation; the only reward is the paper's
skip-ratio tier. Before training the policy gives the marker a few percent; after a few
steps with a fixed seed it must give it clearly more. The same run with the
reward's sign flipped must write it less, so a sign error anywhere between reward and
update (advantages, loss, the LoRA push) fails one of the two.
"""

from __future__ import annotations

import torch

from stepzip.rewards import RewardConfig
from trainer.config import GrpoRunConfig

WORDS = ["[PAD]", "[EOS]", "[SKIP]", "add", "carry", "then", "so", "ok"]
PROMPT = "then so"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="ok"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="ok")


def _policy(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Logits are bounded by |normed hidden| x |head rows|; at the default init (std
        # 0.02) no hidden state can push one word past ~0.25, whatever LoRA learns.
        model.lm_head.weight.mul_(5.0)
    return model


def _marker_probability(model, tokenizer) -> float:
    """Mean probability of [SKIP] at each position of a fixed marker-free continuation
    (teacher forcing): the rewarded quantity, read off the policy without sampling."""
    ids = tokenizer(PROMPT + " add then add then add then", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)[0, 1:-1, WORDS.index("[SKIP]")]
    return float(probs.mean())


def _train(tmp_path, sign: float) -> tuple[float, float]:
    from datasets import Dataset

    from trainer.grpo import build_trainer

    tokenizer = _tokenizer()
    model = _policy()
    reward = RewardConfig(correctness=False, skip_count=False, length=False,
                          skip_ratio_high_reward=sign * 1.0, skip_ratio_mid_reward=sign * 0.5,
                          step_delimiter=" ")
    cfg = GrpoRunConfig(output_dir=str(tmp_path / f"run{sign:+.0f}"), num_generations=8,
                        prompts_per_step=2, max_completion_length=3, max_steps=16,
                        learning_rate=5e-2, lr_scheduler="constant", lora_r=8, lora_alpha=16,
                        dtype="float32", save_steps=0, temperature=1.0, seed=0, plot=False,
                        threads=1)
    dataset = Dataset.from_list([{"prompt": PROMPT, "answer": "7"}] * 32)
    before = _marker_probability(model, tokenizer)
    trainer = build_trainer(cfg, model, tokenizer, dataset, reward)
    trainer.train()
    after = _marker_probability(trainer.model, tokenizer)
    return before, after


def test_grpo_raises_the_rewarded_marker_and_lowers_a_penalised_one(tmp_path) -> None:
    torch.set_num_threads(1)
    before, rewarded = _train(tmp_path, +1.0)
    _, penalised = _train(tmp_path, -1.0)
    print(f"\nP([SKIP]) before {before:.3f}; after GRPO rewarding it {rewarded:.3f}; "
          f"after GRPO penalising it {penalised:.3f}")
    assert before < 0.25
    assert rewarded > before + 0.25
    assert penalised < before / 2

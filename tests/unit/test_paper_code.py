"""The ``paper-code`` preset agrees with a reference written from PAPER_CODE.md alone.

The reference below reads the shared notes' rules the way the authors' script would: a
loop over (token text, logprob) pairs, a dict keyed by stripped step text, ``int(N *
kappa)``, ``sorted`` and ``"".join``; the rewards as string slicing and counting. It is
compared with the product's code paths (``stepzip.papercode`` through
``stepzip.compression.compress`` and ``stepzip.rewards.make_trl_reward_funcs``) on seeded
generated traces: consecutive delimiters, merged blank lines that must not split,
repeated steps (also differing only in surrounding whitespace), ties in score, traces
with and without ``</think>``, and step counts where N * kappa falls just under an
integer in floating point.
"""

from __future__ import annotations

import math
import random

import pytest

from stepzip import papercode
from stepzip.compression import PruneSpec, compress
from stepzip.rewards import COMPONENTS, RewardConfig, make_trl_reward_funcs

N_TRACES = 1200
N_COMPLETIONS = 1000
KAPPAS = (0.0, 0.1, 0.14, 0.2, 0.29, 0.3, 0.35, 0.5, 0.57, 0.58, 0.7, 0.8, 0.9, 1.0)

# ---- the reference, from PAPER_CODE.md's text -----------------------------------------


def reference_steps(tokens: list[str], logprobs: list[float]) -> dict[str, float]:
    """Stripped step text -> mean score, in the dict's order (first position, last score)."""
    steps: dict[str, float] = {}
    text, scores = "", []
    for token, logprob in zip(tokens, logprobs, strict=True):
        if token == "</think>":  # tokens up to the first </think>
            break
        text += token
        if token == "\n\n":  # the delimiter ends the step; its score is not counted
            steps[text.strip()] = math.fsum(scores) / len(scores) if scores else 0.0
            text, scores = "", []
        else:
            p = math.exp(logprob)
            scores.append(-p * logprob)
    if text:  # text after the last delimiter is a last step
        steps[text.strip()] = math.fsum(scores) / len(scores)
    return steps


def reference_compress(steps: dict[str, float], kappa: float) -> str:
    count = int(len(steps) * kappa)
    ranked = sorted(steps.items(), key=lambda item: item[1])  # stable, ascending
    pruned = {text for text, _ in ranked[:count]}
    return "".join("[SKIP]" if text in pruned else text for text in steps)


def reference_rewards(completion: str, gold: str, n_tokens: int) -> dict[str, float]:
    close = completion.find("</think>")
    thinking = completion[:close]  # index -1 without one: all but the last character
    skips = thinking.count("[SKIP]")
    steps = thinking.count("\n\n") + skips
    ratio = skips / (steps if steps != 0 else 1)
    parsed = _parse(completion[close:])
    return {
        "correctness": 2.0 if parsed and str(parsed[-1]) == gold else 0.0,
        "skip_ratio": 1.0 if ratio >= 0.8 else 0.5 if ratio >= 0.5 else 0.0,
        "skip_count": -2.0 if skips > 100 else 0.0,
        "length": -1.0 if n_tokens > 3500 else 0.0,
    }


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


# ---- generated traces -----------------------------------------------------------------

WORDS = ("The", " sum", " is", " 4", ".", " so", " x", " =", " 2", " we", " get", "Let",
         " me", " check", ",", " then", "Wait", " 12")
NOT_DELIMITERS = (".\n\n", "\n\nThe", ":\n\n", "\n", " \n\n ", "\n\n\n")
DISCRETE_LOGPROBS = (0.0, -0.1, -0.5, -1.0, -2.0)


def _body(rng: random.Random) -> list[str]:
    body = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.15:
        body.insert(rng.randrange(len(body) + 1), rng.choice(NOT_DELIMITERS))
    return body


def generated_trace(rng: random.Random, pool: list[list[str]]) -> tuple[list[str], list[float]]:
    """Tokens and logprobs of one trace (reasoning, maybe </think> and an answer)."""
    tokens: list[str] = []
    for _ in range(rng.choice((0, 1, 2, 3, 5, 8, 13, 21, 40))):
        body = list(rng.choice(pool)) if rng.random() < 0.4 else _body(rng)
        if rng.random() < 0.2:  # the same step with other surrounding whitespace
            body = [" ", *body] if rng.random() < 0.5 else [*body, " "]
        tokens += body
        tokens += ["\n\n"] * (rng.choice((2, 3)) if rng.random() < 0.15 else 1)
    if rng.random() < 0.4 or not tokens:  # a last step with no delimiter after it
        tokens += _body(rng)
    if rng.random() < 0.6:
        tokens += ["</think>", "\n\n", "The", " answer", "\n\n", " 12"]
    discrete = rng.random() < 0.5  # ties between steps' scores
    logprobs = [rng.choice(DISCRETE_LOGPROBS) if discrete else -rng.expovariate(1.5)
                for _ in tokens]
    return tokens, logprobs


def product_steps(tokens: list[str], logprobs: list[float]):
    return papercode.segment(tokens, logprobs)


def product_text(steps, kappa: float) -> str:
    return compress(steps, PruneSpec(strategy="low", ratio=kappa, paper_code=True)).text


def _traces(seed: int) -> list[tuple[list[str], list[float]]]:
    rng = random.Random(seed)
    pool = [_body(rng) for _ in range(6)]
    return [generated_trace(rng, pool) for _ in range(N_TRACES)]


def _hundred_steps() -> tuple[list[str], list[float]]:
    """100 distinct steps: 0.29 * 100 is 28.999999999999996 in floating point."""
    tokens, rng = [], random.Random(7)
    for i in range(100):
        tokens += [f"Step {i}", " done", "\n\n"]
    return tokens, [-rng.expovariate(1.0) for _ in tokens]


def test_steps_scores_and_texts_match_the_reference() -> None:
    traces = [*_traces(seed=23), _hundred_steps()]
    features = {"consecutive": 0, "duplicate": 0, "merged": 0, "no_close": 0,
                "float_boundary": 0}
    for tokens, logprobs in traces:
        expected = reference_steps(tokens, logprobs)
        steps = product_steps(tokens, logprobs)
        assert [s.text.strip() for s in steps] == list(expected)
        assert [s.score for s in steps] == pytest.approx(list(expected.values()), abs=1e-12)
        for kappa in KAPPAS:
            assert product_text(steps, kappa) == reference_compress(expected, kappa), (
                tokens, kappa)
            n = len(expected)
            if int(n * kappa) != math.floor(round(n * kappa, 9)):
                features["float_boundary"] += 1
        reasoning = tokens[:tokens.index("</think>")] if "</think>" in tokens else tokens
        raw = "".join(reasoning).split("\n\n")
        features["consecutive"] += "\n\n\n\n" in "".join(reasoning)
        features["duplicate"] += len(expected) < sum(1 for t in reasoning if t == "\n\n")
        features["merged"] += any(t in NOT_DELIMITERS for t in reasoning) and len(raw) > 1
        features["no_close"] += "</think>" not in tokens
    assert len(traces) >= 1000
    assert all(count > 0 for count in features.values()), features


def test_boundary_case_prunes_by_truncation() -> None:
    tokens, logprobs = _hundred_steps()
    steps = product_steps(tokens, logprobs)
    assert len(steps) == 100
    assert product_text(steps, 0.29).count("[SKIP]") == 28  # the default would prune 29


# ---- rewards --------------------------------------------------------------------------


class CharTokenizer:
    """Re-encodes text one id per character; holds no marker token."""

    unk_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [1] * len(text)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id


def generated_completion(rng: random.Random) -> str:
    """Reasoning with markers and blank lines, closed or not, an answer, sometimes long."""
    pieces = ["[SKIP]"] * rng.choice((0, 1, 3, 8, 50, 99, 100, 101, 102, 150))
    pieces += [f"step {i}.\n\n" for i in range(rng.choice((0, 1, 2, 5, 20, 30)))]
    rng.shuffle(pieces)
    text = "".join(pieces)
    if rng.random() < 0.3:
        text += "x" * rng.randint(3400, 3600)
    if rng.random() < 0.6:
        text += "</think>\n\n" + "[SKIP]" * rng.choice((0, 5)) + rng.choice(
            ("The answer is \\boxed{12}.", "So 12", "\\boxed{7}", "no idea"))
        if rng.random() < 0.2:
            text += "</think> again \\boxed{5}"
    else:
        text += rng.choice(("[SKIP]", "\n\n", "7", "\\boxed{12}", "x", "12"))
    return text


def test_rewards_match_the_reference() -> None:
    rng = random.Random(5)
    completions = [generated_completion(rng) for _ in range(N_COMPLETIONS)]
    golds = [rng.choice(("12", "7", "5")) for _ in completions]
    ids = [[1] * rng.randint(0, 4000) for _ in completions]  # not what the rule counts
    tokenizer = CharTokenizer()
    funcs = make_trl_reward_funcs(RewardConfig(paper_code=True), tokenizer)
    got = {f.__name__: f(prompts=["p"] * len(completions), completions=completions,
                         completion_ids=ids, answer=golds) for f in funcs}
    assert set(got) == set(COMPONENTS)
    seen = {name: set() for name in COMPONENTS}
    for i, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        expected = reference_rewards(completion, gold, len(tokenizer.encode(completion)))
        assert {name: got[name][i] for name in COMPONENTS} == expected, completion[-200:]
        for name, value in expected.items():
            seen[name].add(value)
    assert all(len(values) > 1 for values in seen.values()), seen  # every tier reached


def test_correctness_without_think_close_grades_the_last_character() -> None:
    assert papercode.is_correct("... so it is \\boxed{12} and then 7", "7")
    assert not papercode.is_correct("... so it is \\boxed{12} and then x", "12")
    assert papercode.is_correct("steps</think>The answer is \\boxed{\\frac12}", "0.5")


def test_an_ungradable_answer_is_not_correct(monkeypatch) -> None:
    from stepzip import grader

    def too_slow(*args, **kwargs):
        raise grader.GradingTimeout("ran past the deadline")

    monkeypatch.setattr(grader.Grader, "call", too_slow)
    assert not papercode.is_correct("</think>\\boxed{12}", "12")


# ---- settings, answer prompt, request defaults ----------------------------------------


def test_answer_prompt_appends_their_suffix() -> None:
    assert papercode.answer_prompt("P<think>\n", "a[SKIP]b") == "P<think>\na[SKIP]b\n</think>\n\n"


def test_settings_match_paper_code_md() -> None:
    from stepzip.schemas.compress import CompressRequest, Problem
    from trainer.config import BuildSftConfig, GrpoRunConfig, SftRunConfig, with_preset

    request = CompressRequest(problems=[Problem(text="1+1?")], preset="paper-code")
    assert (request.sampling.temperature, request.sampling.top_p) == (0.6, 0.95)
    assert (request.step_score, request.delimiter) == ("sampled", "\n\n")
    assert "[Math Problem]" in request.prompt_template
    assert "\\boxed{}" in request.prompt_template.format(problem="x")
    assert papercode.ANSWER_TEMPERATURE == 0.6
    build = with_preset(BuildSftConfig, "paper-code")
    assert (build.paper_code, build.temperature, build.top_p) == (True, 0.6, 0.95)
    sft = with_preset(SftRunConfig, "paper-code")
    assert (sft.completion_only_loss, sft.learning_rate, sft.lora_alpha, sft.skip_token) == (
        False, 2e-5, 16, "none")
    grpo = with_preset(GrpoRunConfig, "paper-code")
    assert (grpo.temperature, grpo.learning_rate, grpo.warmup_steps, grpo.weight_decay,
            grpo.max_grad_norm) == (0.6, 1e-5, 100, 0.01, 1.0)
    assert (grpo.lora_r, grpo.lora_alpha, grpo.lora_dropout) == (16, 32, 0.05)
    assert grpo.num_generations == 14 and grpo.reward.paper_code
    assert "[SKIP]" in grpo.system
    assert with_preset(GrpoRunConfig, "paper-code", num_generations=8).num_generations == 8


def test_request_refuses_what_paper_code_fixes() -> None:
    from pydantic import ValidationError

    from stepzip.schemas.compress import CompressRequest, Problem

    with pytest.raises(ValidationError, match="step_score"):
        CompressRequest(problems=[Problem(text="q")], preset="paper-code", step_score="sum")
    with pytest.raises(ValidationError, match="delimiter"):
        CompressRequest(problems=[Problem(text="q")], preset="paper-code", delimiter="\n")
    unset = CompressRequest(problems=[Problem(text="q")], preset="paper-code", delimiter=None)
    assert unset.delimiter == "\n\n"  # None is "the default", as clients send it
    given = CompressRequest(problems=[Problem(text="q")], preset="paper-code",
                            sampling={"temperature": 0.0})
    assert (given.sampling.temperature, given.sampling.top_p) == (0.0, 0.95)


def test_eval_answers_and_records_by_the_preset() -> None:
    from clients.eval import EvalConfig, answer_body, summarize

    cfg = EvalConfig(preset="paper-code", step_score="sampled", ratios=(0.8,),
                     strategies=("low",), bootstrap=100)
    assert answer_body(["p"], cfg, thinking=True)["temperature"] == 0.6
    row = {"id": "a", "samples": [{"full": {"correct": True}, "trace_correct": True,
                                   "n_steps": 2, "cells": [{
                                       "strategy": "low", "ratio": 0.8, "correct": True,
                                       "preserved": True, "tokens_before": 4,
                                       "tokens_kept": 2}]}],
           "notes": [papercode.NO_THINK_NOTE]}
    summary = summarize([row], cfg)
    assert summary["rules"] == papercode.rules()
    assert summary["notes"] == [papercode.NO_THINK_NOTE]
    with pytest.raises(ValueError, match="sampled"):
        EvalConfig(preset="paper-code", step_score="sum")


def test_paper_code_sft_runs_without_a_marker_token(tmp_path, default_model_dir):
    """One step of the preset's SFT (whole-sequence loss) on a tiny random Llama: the
    vocabulary is unchanged ([SKIP] spelled in ordinary tokens)."""
    torch = pytest.importorskip("torch")
    import json

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.config import SftRunConfig, with_preset
    from trainer.sft import run_sft

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": f"What is {i} + 1?\n", "completion": f"{i}[SKIP][SKIP]\n</think>\n\n{i + 1}",
        "marker": "[SKIP]", "think_close": "</think>"}) + "\n" for i in range(4)))
    cfg = with_preset(SftRunConfig, "paper-code", model=str(base), data=str(data),
                      output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=2,
                      grad_accum=1, dtype="float32", max_length=128, logging_steps=1,
                      lora_r=4, plot=False)
    summary = run_sft(cfg, log=lambda message: None)
    assert summary["skip_token_id"] is None
    assert len(AutoTokenizer.from_pretrained(tmp_path / "sft")) == len(tok)

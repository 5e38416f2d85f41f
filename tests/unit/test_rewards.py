"""The paper's GRPO reward (stepzip.rewards): thresholds, switches, TRL adapters."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import pytest

from stepzip.rewards import (
    COMPONENTS,
    RewardConfig,
    count_skips,
    count_steps,
    make_trl_reward_funcs,
    skip_count_reward,
    skip_ratio,
    skip_ratio_reward,
)

CFG = RewardConfig()
SKIP_ID = 99


def _completion(kept: int, skipped: int, answer: str = "42", marker: str = "[SKIP]") -> str:
    """Reasoning of ``kept`` real steps then ``skipped`` marker steps, then an answer."""
    steps = [f"Step {i}: compute." for i in range(kept)] + [marker] * skipped
    return "\n\n".join(steps) + f"\n</think>\nThe answer is {answer}."


def _rewards(text: str, gold: str | None, n_tokens: int, cfg: RewardConfig = CFG, *,
             ids: list[int] | None = None, tokenizer=None) -> dict[str, float]:
    """Every component of one completion as training computes it (the functions
    make_trl_reward_funcs gives TRL); a switched-off component is 0.0."""
    ids = ids if ids is not None else [1] * n_tokens
    funcs = make_trl_reward_funcs(cfg, tokenizer)
    got = {f.__name__: f(prompts=["p"], completions=[text], completion_ids=[ids],
                         answer=[gold])[0] for f in funcs}
    return {name: got.get(name, 0.0) for name in COMPONENTS}


# --- correctness -------------------------------------------------------------------------


def test_correct_answer_after_think_close_earns_reward() -> None:
    parts = _rewards(_completion(1, 4), "42", 10, CFG)
    assert parts["correctness"] == 2.0


def test_wrong_answer_earns_nothing() -> None:
    assert _rewards(_completion(1, 4, "41"), "42", 10, CFG)["correctness"] == 0.0


def test_equivalent_answer_forms_are_correct() -> None:
    text = "Half of it.\n</think>\n$\\boxed{\\frac{1}{2}}$"
    assert _rewards(text, "0.5", 10, CFG)["correctness"] == 2.0


def test_without_think_close_correctness_is_zero_and_whole_text_is_reasoning() -> None:
    text = "Step.\n\n[SKIP]\n\n[SKIP]\n\n[SKIP]\n\n[SKIP]\n\nThe answer is 42."
    parts = _rewards(text, "42", 10, CFG)
    assert parts["correctness"] == 0.0
    assert parts["skip_ratio"] == 0.5  # 4 skips of 6 steps, the answer step included


def test_answer_only_in_reasoning_is_not_credited() -> None:
    text = "The answer is 42.\n</think>\nI am not sure."
    assert _rewards(text, "42", 10, CFG)["correctness"] == 0.0


def test_missing_gold_gives_no_correctness() -> None:
    assert _rewards(_completion(1, 4), None, 10, CFG)["correctness"] == 0.0


# --- skip ratio --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "reward"),
    [(1.0, 1.0), (0.8, 1.0), (0.79999, 0.5), (0.5, 0.5), (0.49999, 0.0), (0.49, 0.0), (0.0, 0.0)],
)
def test_skip_ratio_tiers(ratio: float, reward: float) -> None:
    assert skip_ratio_reward(ratio, CFG) == reward


@pytest.mark.parametrize(
    ("kept", "skipped", "reward"),
    [(1, 4, 1.0), (2, 8, 1.0), (20001, 79999, 0.5), (1, 1, 0.5), (51, 49, 0.0), (3, 0, 0.0)],
)
def test_skip_ratio_component_from_counted_steps(kept: int, skipped: int, reward: float) -> None:
    parts = _rewards(_completion(kept, skipped), "42", 10, CFG)
    assert parts["skip_ratio"] == reward


def test_skip_ratio_counts_skip_steps_in_the_denominator() -> None:
    reasoning = "a\n\n[SKIP]\n\nb\n\n[SKIP]"
    assert count_steps(reasoning, "\n\n") == 4
    assert skip_ratio(reasoning, 2) == 0.5


def test_empty_steps_are_not_steps() -> None:
    assert count_steps("a\n\n\n\n  \n\nb\n\n", "\n\n") == 2
    assert skip_ratio("", 0) == 0.0


def test_custom_thresholds_and_rewards() -> None:
    cfg = replace(CFG, skip_ratio_high=0.6, skip_ratio_high_reward=3.0, skip_ratio_mid=0.2)
    assert skip_ratio_reward(0.6, cfg) == 3.0
    assert skip_ratio_reward(0.2, cfg) == 0.5
    assert skip_ratio_reward(0.19, cfg) == 0.0


def test_custom_delimiter_and_marker() -> None:
    cfg = replace(CFG, step_delimiter="\n", marker="<skip>")
    text = "a\n<skip>\n<skip>\n<skip>\n<skip>\n</think>42"
    parts = _rewards(text, "42", 10, cfg)
    assert parts["skip_ratio"] == 1.0
    assert parts["correctness"] == 2.0


# --- skip count --------------------------------------------------------------------------


@pytest.mark.parametrize(("n_skips", "reward"), [(0, 0.0), (100, 0.0), (101, -2.0)])
def test_skip_count_threshold(n_skips: int, reward: float) -> None:
    assert skip_count_reward(n_skips, CFG) == reward


@pytest.mark.parametrize(("skipped", "reward"), [(100, 0.0), (101, -2.0)])
def test_skip_count_component(skipped: int, reward: float) -> None:
    parts = _rewards(_completion(1, skipped), "42", 10, CFG)
    assert parts["skip_count"] == reward


# --- length ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tokens", "reward"), [(3499, 0.0), (3500, 0.0), (3501, -1.0)])
def test_length_threshold(n_tokens: int, reward: float) -> None:
    assert _rewards(_completion(1, 4), "42", n_tokens, CFG)["length"] == reward


# --- special-token [SKIP] ----------------------------------------------------------------


def test_skips_counted_from_ids_when_decoding_dropped_them() -> None:
    text = _completion(1, 4, marker="")  # what skip_special_tokens=True leaves behind
    ids = [1, SKIP_ID, 2, SKIP_ID, SKIP_ID, 3, SKIP_ID, 4]
    assert count_skips(text) == 0
    assert count_skips(text, ids, SKIP_ID) == 4
    parts = _rewards(text, "42", len(ids), CFG, ids=ids, tokenizer=FakeTokenizer())
    assert parts["skip_ratio"] == 1.0  # 4 skips, 1 kept step


def test_skips_not_double_counted_when_text_kept_them() -> None:
    text = _completion(1, 4)
    ids = [1, SKIP_ID, SKIP_ID, SKIP_ID, SKIP_ID, 2]
    assert count_skips(text, ids, SKIP_ID) == 4
    parts = _rewards(text, "42", 6, CFG, ids=ids, tokenizer=FakeTokenizer())
    assert parts["skip_ratio"] == 1.0


def test_skips_counted_from_text_without_a_skip_token() -> None:
    assert count_skips("a [SKIP] b [SKIP]", [1, 2, 3]) == 2
    assert count_skips(None) == 0


# --- switches and totals -----------------------------------------------------------------


def test_all_components_present_and_summed() -> None:
    parts = _rewards(_completion(1, 4), "42", 3501, CFG)
    assert list(parts) == list(COMPONENTS)
    assert parts == {"correctness": 2.0, "skip_ratio": 1.0, "skip_count": 0.0, "length": -1.0}
    assert sum(parts.values()) == 2.0  # TRL sums the functions, weight 1 each


@pytest.mark.parametrize("component", COMPONENTS)
def test_switched_off_component_gives_zero(component: str) -> None:
    text = _completion(1, 101)  # every component non-zero when on
    on = _rewards(text, "42", 5000, CFG)
    off = _rewards(text, "42", 5000, replace(CFG, **{component: False}))
    assert on[component] != 0.0
    assert off[component] == 0.0
    assert {k: v for k, v in off.items() if k != component} == {
        k: v for k, v in on.items() if k != component
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"skip_ratio_mid": 0.9},
        {"skip_ratio_high": 1.5},
        {"max_skips": -1},
        {"max_completion_tokens": 0},
        {"marker": ""},
        {"think_close": ""},
        {"step_delimiter": ""},
    ],
)
def test_invalid_config_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RewardConfig(**bad)


# --- TRL adapters ------------------------------------------------------------------------


class FakeTokenizer:
    """The slice of a Hugging Face tokenizer the reward functions use."""

    unk_token_id = 0
    vocab: ClassVar[dict[str, int]] = {"[SKIP]": SKIP_ID}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, self.unk_token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * len(text.split())

    pieces: ClassVar[dict[int, str]] = {
        SKIP_ID: "[SKIP]", 5: "Step", 6: "\n\n", 7: "\n</think>\n", 8: "The answer is 42."}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if i == SKIP_ID and skip_special_tokens else self.pieces.get(i, "x")
                       for i in ids)


def _call_all(funcs: list, completions: list, ids: list | None, golds: list) -> dict:
    return {
        f.__name__: f(
            prompts=["p"] * len(completions),
            completions=completions,
            completion_ids=ids,
            answer=golds,
        )
        for f in funcs
    }


def test_trl_funcs_are_named_after_enabled_components() -> None:
    assert [f.__name__ for f in make_trl_reward_funcs(CFG)] == list(COMPONENTS)
    cfg = replace(CFG, skip_count=False, length=False)
    assert [f.__name__ for f in make_trl_reward_funcs(cfg)] == ["correctness", "skip_ratio"]


def test_trl_funcs_with_string_completions() -> None:
    completions = [_completion(1, 4), _completion(5, 0, "7")]
    ids = [[1] * 10, [1] * 3501]
    got = _call_all(make_trl_reward_funcs(CFG), completions, ids, ["42", "42"])
    assert got == {
        "correctness": [2.0, 0.0],
        "skip_ratio": [1.0, 0.0],
        "skip_count": [0.0, 0.0],
        "length": [0.0, -1.0],
    }


def test_trl_funcs_with_chat_completions() -> None:
    completions = [
        [{"role": "assistant", "content": _completion(1, 4)}],
        [{"role": "assistant", "content": _completion(1, 1, "41")}],
    ]
    got = _call_all(make_trl_reward_funcs(CFG), completions, [[1], [1]], ["42", "42"])
    assert got["correctness"] == [2.0, 0.0]
    assert got["skip_ratio"] == [1.0, 0.5]


def test_trl_funcs_count_special_skip_token_from_ids() -> None:
    text = _completion(1, 4, marker="")
    ids = [[5, 6, SKIP_ID, 6, SKIP_ID, 6, SKIP_ID, 6, SKIP_ID, 7, 8]]
    with_tokenizer = _call_all(make_trl_reward_funcs(CFG, FakeTokenizer()), [text], ids, ["42"])
    text_only = _call_all(make_trl_reward_funcs(CFG), [text], ids, ["42"])
    assert with_tokenizer["skip_ratio"] == [1.0]
    assert text_only["skip_ratio"] == [0.0]


def test_skip_tokens_after_the_reasoning_do_not_count() -> None:
    # One real step, no pruning; the model writes markers in its answer (after </think>).
    text = "Step\n\n</think>\nThe answer is 42. [SKIP][SKIP][SKIP][SKIP]"
    parts = _rewards(text, "42", 10, CFG)
    assert parts["skip_ratio"] == 0.0
    assert count_skips(text) == 0
    ids = [5, 6, 7, 8, SKIP_ID, SKIP_ID, SKIP_ID, SKIP_ID]
    decode = FakeTokenizer().decode
    assert count_skips("Step\n\n</think>\nThe answer is 42.", ids, SKIP_ID,
                       decode=lambda i: decode(i, skip_special_tokens=False)) == 0
    [ratio] = make_trl_reward_funcs(
        replace(CFG, correctness=False, skip_count=False, length=False), FakeTokenizer())
    assert ratio([], ["Step\n\n</think>\nThe answer is 42."], [ids]) == [0.0]


def test_skip_count_penalty_counts_reasoning_markers_only() -> None:
    text = "Step\n\n</think>\nThe answer is 42." + " [SKIP]" * 150
    assert _rewards(text, "42", 10, CFG)["skip_count"] == 0.0


@pytest.mark.parametrize(
    "reasoning",
    ["a\n\n\nb", "a\r\n\r\nb", "\n\na\n\nb", "a\n\n \n\nb\n\n\n"],
)
def test_steps_are_counted_as_segment_cuts_them(reasoning: str) -> None:
    from stepzip.steps import segment, token_char_offsets

    steps = segment(reasoning, token_char_offsets(list(reasoning)), None,
                    span=(0, len(reasoning)))
    assert count_steps(reasoning, "\n\n") == len(steps) == 2


def test_trl_length_from_tokenizer_when_ids_are_absent() -> None:
    [length] = make_trl_reward_funcs(
        replace(CFG, correctness=False, skip_ratio=False, skip_count=False), FakeTokenizer()
    )
    assert length([], ["word " * 3501, "word " * 3500], None) == [-1.0, 0.0]


def test_trl_length_without_ids_or_tokenizer_is_an_error() -> None:
    [length] = make_trl_reward_funcs(
        replace(CFG, correctness=False, skip_ratio=False, skip_count=False)
    )
    with pytest.raises(ValueError, match="completion_ids"):
        length([], ["text"], None)


def test_trl_correctness_needs_answer_column() -> None:
    correctness = make_trl_reward_funcs(CFG)[0]
    with pytest.raises(ValueError, match="answer"):
        correctness(["p"], ["x"], [[1]])


def test_trl_funcs_ignore_extra_columns() -> None:
    skip_ratio_func = make_trl_reward_funcs(CFG)[1]
    got = skip_ratio_func(["p"], [_completion(1, 4)], [[1]], answer=["42"], level=["3"])
    assert got == [1.0]

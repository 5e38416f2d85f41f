"""Pruning strategies, rendering and spec validation (stepzip/compression.py)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepzip.compression import (
    DEFAULT_MARKER,
    STRATEGIES,
    Compressed,
    PruneSpec,
    compress,
    select_steps,
    validate_spec,
)
from stepzip.steps import Step, segment, token_char_offsets


class Trace:
    """A segmented completion: step i is "s<i> body.\\n\\n", two tokens, entropy sums[i]."""

    def __init__(self, sums: Sequence[float], last_delimiter: str = "\n\n") -> None:
        pieces: list[str] = []
        self.entropies: list[float] = []
        for i, total in enumerate(sums):
            tail = last_delimiter if i == len(sums) - 1 else "\n\n"
            pieces += [f"s{i}", f" body.{tail}"]
            self.entropies += [total, 0.0]
        self.text = "".join(pieces)
        self.offsets = token_char_offsets(pieces)
        self.steps = segment(self.text, self.offsets, self.entropies) if pieces else []

    def compress(self, **spec_fields) -> Compressed:
        return compress(
            self.steps,
            PruneSpec(**spec_fields),
            token_entropies=self.entropies,
            token_offsets=self.offsets,
            text=self.text,
        )


def expected_prune_count(kappa: float, n_steps: int) -> int:
    """floor(kappa * n) with kappa as the decimal it prints as."""
    return math.floor(Fraction(repr(kappa)) * n_steps)


# ---------------------------------------------------------------------------
# selection


def test_low_prunes_the_lowest_entropy_steps() -> None:
    trace = Trace([5.0, 1.0, 4.0, 2.0, 3.0])
    assert select_steps(trace.steps, PruneSpec(ratio=0.4)) == (1, 3)


def test_high_prunes_the_highest_entropy_steps() -> None:
    trace = Trace([5.0, 1.0, 4.0, 2.0, 3.0])
    assert select_steps(trace.steps, PruneSpec(strategy="high", ratio=0.4)) == (0, 2)


def test_ties_break_towards_the_lower_index() -> None:
    trace = Trace([1.0, 1.0, 1.0, 1.0])
    assert select_steps(trace.steps, PruneSpec(ratio=0.5)) == (0, 1)
    assert select_steps(trace.steps, PruneSpec(strategy="high", ratio=0.5)) == (0, 1)


def test_random_is_seeded_sampling() -> None:
    trace = Trace([float(i) for i in range(10)])
    spec = PruneSpec(strategy="random", ratio=0.3, seed=7)
    expected = tuple(sorted(random.Random(7).sample(range(10), 3)))
    assert select_steps(trace.steps, spec) == expected
    assert select_steps(trace.steps, spec) == expected


@pytest.mark.parametrize(
    ("kappa", "n_steps", "count"), [(0.8, 10, 8), (0.8, 4, 3), (0.5, 3, 1), (0.29, 100, 29)]
)
def test_number_pruned_is_floor_of_kappa_times_steps(
    kappa: float, n_steps: int, count: int
) -> None:
    trace = Trace([1.0] * n_steps)
    assert len(select_steps(trace.steps, PruneSpec(ratio=kappa))) == count


def test_adaptive_threshold() -> None:
    trace = Trace([0.5, 2.0, 1.0, 0.9])
    spec = PruneSpec(strategy="adaptive", threshold=1.0)
    assert select_steps(trace.steps, spec) == (0, 3)


def test_adaptive_mass() -> None:
    trace = Trace([4.0, 1.0, 2.0, 3.0])  # total 10: 1 + 2 = 3 <= 3.5 < 1 + 2 + 3
    spec = PruneSpec(strategy="adaptive", mass=0.35)
    assert select_steps(trace.steps, spec) == (1, 2)
    assert select_steps(trace.steps, PruneSpec(strategy="adaptive", mass=1.0)) == (0, 1, 2, 3)


def test_token_strategy_selects_no_steps() -> None:
    assert select_steps(Trace([1.0, 2.0]).steps, PruneSpec(strategy="token")) == ()


# ---------------------------------------------------------------------------
# rendering


def test_each_pruned_step_becomes_a_marker_with_its_blank_line() -> None:
    result = Trace([3.0, 1.0, 2.0, 0.5], last_delimiter="").compress(ratio=0.5)
    assert result.pruned == (1, 3)
    assert result.kept == (0, 2)
    assert result.text == "s0 body.\n\n[SKIP]\n\ns2 body.\n\n[SKIP]"
    assert (result.n_skipped, result.n_markers) == (2, 2)
    assert result.pruned_tokens == (2, 3, 6, 7)
    assert (result.tokens_before, result.tokens_kept) == (8, 4)
    assert result.reduction == 0.5


def test_merge_runs_writes_one_marker_per_run() -> None:
    result = Trace([1.0, 1.0, 5.0, 1.0]).compress(ratio=0.75, merge_runs=True, marker="<skip>")
    assert result.text == "<skip>\n\ns2 body.\n\n<skip>\n\n"
    assert (result.n_skipped, result.n_markers) == (3, 2)


def test_pruned_step_keeps_its_trailing_whitespace_when_it_has_no_blank_line() -> None:
    result = Trace([2.0, 1.0], last_delimiter="\n").compress(ratio=0.5)
    assert result.text == "s0 body.\n\n[SKIP]\n"


def test_pruned_step_snapped_over_a_fused_token_keeps_only_its_blank_line() -> None:
    pieces = ["Add", ".", "\n\nThe", " sum", "."]
    text = "".join(pieces)
    offsets = token_char_offsets(pieces)
    steps = segment(text, offsets, [0.1, 0.1, 0.1, 5.0, 5.0])
    assert steps[0].text == "Add.\n\nThe"
    assert compress(steps, PruneSpec(ratio=0.5)).text == "[SKIP]\n\n sum."


def test_repeated_steps_are_pruned_independently() -> None:
    pieces = ["Wait", ".\n\n", "Wait", ".\n\n", "Wait", ".\n\n"]
    text = "".join(pieces)
    steps = segment(text, token_char_offsets(pieces), [1.0, 0.0, 3.0, 0.0, 2.0, 0.0])
    result = compress(steps, PruneSpec(ratio=0.34))
    assert result.pruned == (0,)
    assert result.text == "[SKIP]\n\nWait.\n\nWait.\n\n"


def test_kappa_zero_is_the_identity() -> None:
    trace = Trace([3.0, 1.0, 2.0])
    result = trace.compress(ratio=0.0)
    assert result.text == "".join(s.text for s in trace.steps) == trace.text
    assert result.pruned == () and result.n_markers == 0 and result.reduction == 0.0


def test_kappa_one_prunes_every_step() -> None:
    result = Trace([3.0, 1.0, 2.0]).compress(ratio=1.0)
    assert result.pruned == (0, 1, 2) and result.kept == ()
    assert result.text == "[SKIP]\n\n" * 3
    assert result.tokens_kept == 0 and result.reduction == 1.0


def test_no_steps_gives_an_empty_result() -> None:
    result = compress([], PruneSpec())
    assert result.text == "" and result.n_steps == 0 and result.reduction == 0.0
    assert compress([], PruneSpec(strategy="token")).pruned_tokens == ()


# ---------------------------------------------------------------------------
# token-level baseline


def test_token_strategy_removes_the_lowest_entropy_tokens_within_the_low_budget() -> None:
    trace = Trace([3.0, 1.0, 2.0, 4.0])
    low = trace.compress(ratio=0.5)
    token = trace.compress(strategy="token", ratio=0.5)
    assert len(token.pruned_tokens) == len(low.pruned_tokens) == 4
    # the four zero-entropy " body.\n\n" tokens go first, lowest index first
    assert token.pruned_tokens == (1, 3, 5, 7)
    assert token.text == "s0s1s2s3"
    assert (token.pruned, token.kept, token.n_markers) == ((), (0, 1, 2, 3), 0)
    assert token.reduction == low.reduction == 0.5


@pytest.mark.parametrize("missing", ["token_entropies", "token_offsets", "text"])
def test_token_strategy_names_a_missing_argument(missing: str) -> None:
    trace = Trace([1.0, 2.0])
    arguments = {
        "token_entropies": trace.entropies,
        "token_offsets": trace.offsets,
        "text": trace.text,
    }
    arguments[missing] = None
    with pytest.raises(ValueError, match=missing):
        compress(trace.steps, PruneSpec(strategy="token"), **arguments)


def test_token_strategy_only_touches_the_reasoning() -> None:
    pieces = ["<think>", "a", " b", ".\n\n", "c", "</think>", "ans"]
    text = "".join(pieces)
    offsets = token_char_offsets(pieces)
    entropies = [0.0, 2.0, 0.1, 3.0, 1.0, 0.0, 0.0]
    steps = segment(text, offsets, entropies)
    result = compress(
        steps,
        PruneSpec(strategy="token", ratio=0.5),
        token_entropies=entropies,
        token_offsets=offsets,
        text=text,
    )
    # low at 0.5 prunes the step "c" (one token), so one token may go: " b", the lowest
    assert result.tokens_before == 4
    assert result.pruned_tokens == (2,)
    assert result.text == "a.\n\nc"


# ---------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("ratio", [-0.1, 1.1, math.nan, None])
def test_bad_ratio_is_rejected(ratio: float | None) -> None:
    with pytest.raises(ValueError, match="ratio"):
        validate_spec(PruneSpec(ratio=ratio))
    with pytest.raises(ValueError, match="ratio"):
        compress(Trace([1.0]).steps, PruneSpec(ratio=ratio))


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="strategy"):
        compress(Trace([1.0]).steps, PruneSpec(strategy="median"))


def test_empty_marker_is_rejected() -> None:
    with pytest.raises(ValueError, match="marker"):
        validate_spec(PruneSpec(marker=""))


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({}, "threshold"),
        ({"threshold": 1.0, "mass": 0.5}, "mass"),
        ({"mass": 1.5}, "mass"),
        ({"mass": -0.5}, "mass"),
        ({"threshold": math.nan}, "threshold"),
    ],
)
def test_bad_adaptive_spec_is_rejected(fields: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        validate_spec(PruneSpec(strategy="adaptive", **fields))


def test_adaptive_ignores_the_default_ratio() -> None:
    validate_spec(PruneSpec(strategy="adaptive", ratio=None, mass=0.2))
    validate_spec(PruneSpec(strategy="adaptive", mass=0.2))


def test_defaults_follow_the_paper() -> None:
    spec = PruneSpec()
    assert (spec.strategy, spec.ratio, spec.marker) == ("low", 0.8, "[SKIP]")
    assert DEFAULT_MARKER == "[SKIP]"
    assert set(STRATEGIES) == {"low", "high", "random", "token", "adaptive"}


# ---------------------------------------------------------------------------
# properties

_SUMS = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]), max_size=25)
_KAPPA = st.floats(0.0, 1.0)


def assert_in_order(parts: Sequence[str], text: str) -> None:
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= 0, f"{part!r} missing or out of order"
        position = found + len(part)


@settings(max_examples=200, deadline=None)
@given(_SUMS, _KAPPA, st.sampled_from(["low", "high", "random"]), st.booleans())
def test_step_pruning_properties(sums, kappa, strategy, merge_runs) -> None:
    trace = Trace(sums)
    result = trace.compress(strategy=strategy, ratio=kappa, seed=3, merge_runs=merge_runs)
    n = len(trace.steps)
    assert result.n_steps == n
    assert len(result.pruned) == result.n_skipped == expected_prune_count(kappa, n)
    assert sorted(result.pruned + result.kept) == list(range(n))
    assert list(result.kept) == sorted(result.kept)
    assert_in_order([trace.steps[i].text for i in result.kept], result.text)
    assert result.text.count(DEFAULT_MARKER) == result.n_markers
    assert result.n_markers <= result.n_skipped
    if not merge_runs:
        assert result.n_markers == result.n_skipped
    assert result.tokens_kept == sum(trace.steps[i].n_tokens for i in result.kept)
    assert result.tokens_kept + len(result.pruned_tokens) == result.tokens_before
    if kappa == 0.0:
        assert result.text == trace.text
    if kappa == 1.0:
        assert result.pruned == tuple(range(n))


@settings(max_examples=200, deadline=None)
@given(_SUMS, _KAPPA)
def test_low_prunes_no_step_above_a_kept_one(sums, kappa) -> None:
    trace = Trace(sums)
    result = trace.compress(ratio=kappa)
    if result.pruned and result.kept:
        assert max(trace.steps[i].entropy_sum for i in result.pruned) <= min(
            trace.steps[i].entropy_sum for i in result.kept
        )


@settings(max_examples=200, deadline=None)
@given(_SUMS, _KAPPA, st.data())
def test_token_level_never_exceeds_its_budget(sums, kappa, data) -> None:
    trace = Trace(sums)
    trace.entropies = data.draw(
        st.lists(st.floats(0, 10), min_size=len(trace.offsets), max_size=len(trace.offsets))
    )
    budget = len(trace.compress(ratio=kappa).pruned_tokens)
    result = trace.compress(strategy="token", ratio=kappa)
    assert len(result.pruned_tokens) <= budget
    assert result.tokens_kept == result.tokens_before - len(result.pruned_tokens)
    assert len(result.text) <= len(trace.text)


@settings(max_examples=100, deadline=None)
@given(_SUMS, st.floats(0.0, 1.0))
def test_adaptive_mass_removes_at_most_that_share(sums, mass) -> None:
    trace = Trace(sums)
    result = trace.compress(strategy="adaptive", mass=mass)
    total = sum(sums)
    removed = sum(trace.steps[i].entropy_sum for i in result.pruned)
    assert removed <= mass * total + 1e-9


def test_steps_built_by_hand_are_accepted() -> None:
    steps = [
        Step(0, "a\n\n", 0, 3, 0, 2, 1.0, 0.5, 0.9),
        Step(1, "b", 3, 4, 2, 3, 0.2, 0.2, 0.2),
    ]
    assert compress(steps, PruneSpec(ratio=0.5)).text == "a\n\n[SKIP]"


def test_steps_are_ranked_by_their_score_when_it_is_set() -> None:
    # Step 0: long and low on average; step 1: short and high on average. By the sum
    # step 1 is pruned first, by the mean step 0 is.
    text = "a b c d\n\ne"
    offsets = token_char_offsets(["a", " b", " c", " d\n\n", "e"])
    entropies = [1.0, 1.0, 1.0, 1.0, 3.0]
    by_sum = segment(text, offsets, entropies, score="sum")
    by_mean = segment(text, offsets, entropies, score="mean")
    assert compress(by_sum, PruneSpec(ratio=0.5)).pruned == (1,)
    assert compress(by_mean, PruneSpec(ratio=0.5)).pruned == (0,)
    assert compress(by_mean, PruneSpec(strategy="high", ratio=0.5)).pruned == (1,)
    assert compress(by_mean, PruneSpec(strategy="adaptive", threshold=2.0)).pruned == (0,)


def test_nothing_pruned_keeps_the_reasoning_and_every_token() -> None:
    trace = Trace([1.0, 2.0, 3.0])
    for strategy in ("low", "high", "random", "token"):
        result = trace.compress(strategy=strategy, ratio=0.0)
        assert result.text == trace.text
        assert result.tokens_kept == result.tokens_before and result.reduction == 0.0

"""Reasoning span, step segmentation and step statistics (stepzip/steps.py)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepzip.steps import (
    DEFAULT_DELIMITER,
    Step,
    reasoning_span,
    segment,
    split_char_spans,
    step_token_spans,
    token_char_offsets,
)

# ---------------------------------------------------------------------------
# helpers


def pieces_by_incremental_decode(
    ids: Sequence[int], decode: Callable[[list[int]], str]
) -> list[str]:
    """pieces[i] = what token i adds to the decoded text (the server's contract)."""
    pieces = []
    previous = ""
    for i in range(len(ids)):
        current = decode(list(ids[: i + 1]))
        assert current.startswith(previous), "decoding is not prefix-stable on this text"
        pieces.append(current[len(previous) :])
        previous = current
    return pieces


def expected_reasoning_tokens(
    text: str, offsets: Sequence[tuple[int, int]], start: int, end: int
) -> list[int]:
    """Tokens overlapping [start, end); zero-width ones go with the token after them."""
    chosen = []
    for i, (a, b) in enumerate(offsets):
        if a < b:
            inside = a < end and b > start
        else:
            inside = start <= a < end or a == end == len(text)
        if inside:
            chosen.append(i)
    return chosen


def assert_partition(
    text: str,
    offsets: Sequence[tuple[int, int]],
    steps: Sequence[Step],
    span: tuple[int, int],
    delimiter: str = DEFAULT_DELIMITER,
) -> None:
    """Steps tile the reasoning's characters and tokens, and agree with each other."""
    start, end = span
    assert "".join(step.text for step in steps) == text[start:end]
    tokens = expected_reasoning_tokens(text, offsets, start, end)
    if start == end:
        assert steps == []
        return
    assert [step.index for step in steps] == list(range(len(steps)))
    assert steps[0].char_start == start and steps[-1].char_end == end
    assert steps[0].token_start == tokens[0] and steps[-1].token_end == tokens[-1] + 1
    for step in steps:
        assert step.text == text[step.char_start : step.char_end]
        assert step.n_tokens >= 1
        assert offsets[step.token_start][0] <= step.char_start
        assert offsets[step.token_end - 1][1] >= step.char_end
    for before, after in itertools.pairwise(steps):
        assert before.char_end == after.char_start
        assert before.token_end == after.token_start
        # an inner boundary is a token boundary: no token is split between two steps
        assert offsets[before.token_end - 1][1] == before.char_end
        assert offsets[after.token_start][0] == after.char_start
        assert delimiter in before.text
    if len(steps) > 1:
        assert not any(step.text.isspace() for step in steps)


def segment_pieces(
    pieces: Sequence[str], entropies: Sequence[float] | None = None, **kwargs
) -> tuple[str, list[tuple[int, int]], list[Step]]:
    text = "".join(pieces)
    offsets = token_char_offsets(pieces)
    return text, offsets, segment(text, offsets, entropies, **kwargs)


# ---------------------------------------------------------------------------
# reasoning_span


def test_reasoning_is_between_think_tags() -> None:
    text = "<think>Add.\n\nDone.</think>The answer is 4."
    assert reasoning_span(text) == (len("<think>"), text.index("</think>"))


def test_reasoning_starts_at_zero_when_only_the_close_tag_is_generated() -> None:
    text = "Add.\n\nDone.\n</think>\n4"
    assert reasoning_span(text) == (0, text.index("</think>"))


def test_open_tag_after_the_close_tag_is_ignored() -> None:
    assert reasoning_span("ab</think><think>cd") == (0, 2)


def test_custom_think_tags() -> None:
    text = "[r]x\n\ny[/r]z"
    assert reasoning_span(text, think_open="[r]", think_close="[/r]") == (3, 7)


def test_without_close_tag_the_final_answer_line_is_cut_off() -> None:
    text = "Work.\n\nMore work.\n\nThe answer is 4."
    start, end = reasoning_span(text)
    assert (start, end) == (0, text.index("The answer"))
    assert text[:end].endswith("\n\n")  # blank lines before the answer stay in reasoning


def test_the_last_marker_line_wins() -> None:
    text = "Answer: maybe 3?\n\nNo, recount.\n\nFinal Answer: \\boxed{4}"
    assert reasoning_span(text) == (0, text.index("Final Answer"))


@pytest.mark.parametrize(
    "answer", ["FINAL ANSWER 4", "so the answer is 4", "answer: 4", "$\\boxed{4}$", "#### 4"]
)
def test_each_answer_marker_is_recognised(answer: str) -> None:
    text = f"Think.\n\n{answer}"
    assert reasoning_span(text) == (0, len("Think.\n\n"))


def test_marker_on_the_first_line_keeps_the_whole_text() -> None:
    text = "The answer is 4 because 2 + 2 = 4.\n\nIndeed."
    assert reasoning_span(text) == (0, len(text))


def test_no_marker_and_no_tags_keeps_the_whole_text() -> None:
    assert reasoning_span("just thinking\n\nstill") == (0, len("just thinking\n\nstill"))


def test_open_tag_without_close_tag_is_an_unfinished_thought() -> None:
    # The open tag says a thinking model wrote this; without its close tag the whole
    # rest is reasoning, a tentative "The answer is" included.
    text = "<think>Work.\n\nThe answer is 4."
    assert reasoning_span(text) == (len("<think>"), len(text))


def test_thinking_trace_cut_off_before_the_close_tag_is_all_reasoning() -> None:
    # The case: a thinking model stopped by max_tokens mid-thought.
    text = "First, 3+4=7.\n\nSo the answer is 7.\n\nWait, re-check: 3+5=8.\n\nHmm"
    assert reasoning_span(text, thinking=True) == (0, len(text))
    steps = segment(text, token_char_offsets(list(text)), None, thinking=True)
    assert [s.text for s in steps][-1] == "Hmm" and len(steps) == 4


def test_thinking_trace_with_close_tag_still_ends_there() -> None:
    text = "Add.\n\nThe answer is 4.\n</think>\n4"
    assert reasoning_span(text, thinking=True) == (0, text.index("</think>"))


@pytest.mark.parametrize("argument", ["think_open", "think_close"])
def test_empty_think_tag_is_rejected(argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        reasoning_span("text", **{argument: ""})


# ---------------------------------------------------------------------------
# token_char_offsets


def test_token_char_offsets_are_cumulative_and_allow_zero_width() -> None:
    assert token_char_offsets(["ab", "", "c", "\n\n"]) == [(0, 2), (2, 2), (2, 3), (3, 5)]
    assert token_char_offsets([]) == []


# ---------------------------------------------------------------------------
# split_char_spans


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\n\nb\n\nc", ["a\n\n", "b\n\n", "c"]),
        ("a\n\n\n\nb", ["a\n\n\n\n", "b"]),  # maximal run
        ("a\n\n\nb", ["a\n\n\n", "b"]),  # a partial delimiter closes the run too
        ("\n\na\n\nb", ["\n\na\n\n", "b"]),  # a leading run belongs to the first step
        ("a\n\nb\n\n \n", ["a\n\n", "b\n\n \n"]),  # trailing blank piece merges back
        ("a\n\n \n\nb", ["a\n\n \n\n", "b"]),  # so does a blank piece in the middle
        ("a\n\n", ["a\n\n"]),
        ("no delimiter", ["no delimiter"]),
        ("\n\n", ["\n\n"]),
    ],
)
def test_split_char_spans(text: str, expected: list[str]) -> None:
    spans = split_char_spans(text, 0, len(text))
    assert [text[a:b] for a, b in spans] == expected
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))


def test_split_char_spans_respects_the_range() -> None:
    text = "<think>a\n\nb</think>c\n\nd"
    start, end = reasoning_span(text)
    assert split_char_spans(text, start, end) == [(7, 10), (10, 11)]


def test_split_char_spans_custom_delimiter() -> None:
    text = "one###two######three"
    spans = split_char_spans(text, 0, len(text), "###")
    assert [text[a:b] for a, b in spans] == ["one###", "two######", "three"]


def test_split_char_spans_empty_range() -> None:
    assert split_char_spans("abc", 2, 2) == []


def test_split_char_spans_rejects_an_empty_delimiter() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        split_char_spans("a\n\nb", 0, 4, "")


# ---------------------------------------------------------------------------
# segment on hand-made tokens


def test_fused_period_and_blank_line_stays_with_its_step() -> None:
    text, offsets, steps = segment_pieces(["Add", " two", ".\n\n", "Then", " four", "."])
    assert [s.text for s in steps] == ["Add two.\n\n", "Then four."]
    assert step_token_spans(steps) == [(0, 3), (3, 6)]
    assert_partition(text, offsets, steps, (0, len(text)))


def test_blank_line_fused_with_the_next_word_goes_to_the_earlier_step() -> None:
    text, offsets, steps = segment_pieces(["Add", ".", "\n\nThe", " sum", "."])
    assert [s.text for s in steps] == ["Add.\n\nThe", " sum."]
    assert step_token_spans(steps) == [(0, 3), (3, 5)]
    assert_partition(text, offsets, steps, (0, len(text)))


def test_snapping_never_leaves_a_blank_step() -> None:
    _text, _offsets, steps = segment_pieces(["A", ".", "\n\nB", "\n\n", " \n"])
    assert [s.text for s in steps] == ["A.\n\nB\n\n \n"]


def test_a_token_spanning_two_blank_lines_merges_the_steps() -> None:
    text, offsets, steps = segment_pieces(["A", "\n\nb\n\n", "C"])
    assert [s.text for s in steps] == ["A\n\nb\n\n", "C"]
    assert_partition(text, offsets, steps, (0, len(text)))


def test_zero_width_tokens_go_with_the_following_token() -> None:
    _text, _offsets, steps = segment_pieces(["A.\n\n", "", "", "B", ""])
    assert step_token_spans(steps) == [(0, 1), (1, 5)]  # the trailing one joins the last step


def test_tokens_straddling_the_span_edges_are_clipped_into_the_first_and_last_step() -> None:
    pieces = ["<think>\nA", ".\n\n", "B.\n</", "think>", "4"]
    text = "".join(pieces)
    offsets = token_char_offsets(pieces)
    span = reasoning_span(text)
    steps = segment(text, offsets, None, span=span)
    assert [s.text for s in steps] == ["\nA.\n\n", "B.\n"]
    assert step_token_spans(steps) == [(0, 2), (2, 3)]
    assert_partition(text, offsets, steps, span)


def test_tokens_outside_the_reasoning_belong_to_no_step() -> None:
    pieces = ["<think>", "A", ".\n\n", "B", "</think>", "The", " answer"]
    _text, _offsets, steps = segment_pieces(pieces)
    assert step_token_spans(steps) == [(1, 3), (3, 4)]


def test_repeated_identical_steps_stay_separate() -> None:
    _text, _offsets, steps = segment_pieces(["Wait", ".\n\n"] * 3, [1.0, 2.0] * 3)
    assert [s.text for s in steps] == ["Wait.\n\n"] * 3
    assert [s.index for s in steps] == [0, 1, 2]
    assert [s.entropy_sum for s in steps] == [3.0, 3.0, 3.0]


def test_step_statistics() -> None:
    _, _, steps = segment_pieces(["a", "b", ".\n\n", "c"], [0.5, 1.5, 1.0, 2.0])
    first, second = steps
    assert (first.entropy_sum, first.entropy_mean, first.entropy_max) == (3.0, 1.0, 1.5)
    assert (second.entropy_sum, second.entropy_mean, second.entropy_max) == (2.0, 2.0, 2.0)


def test_no_entropies_gives_zero_statistics() -> None:
    _, _, steps = segment_pieces(["a", ".\n\n", "c"], None)
    assert [(s.entropy_sum, s.entropy_mean, s.entropy_max) for s in steps] == [(0.0, 0.0, 0.0)] * 2
    assert [s.n_tokens for s in steps] == [2, 1]


def test_empty_reasoning_gives_no_steps() -> None:
    text = "</think>4"
    assert segment(text, token_char_offsets(["</think>", "4"]), None) == []


def test_custom_delimiter() -> None:
    _, _, steps = segment_pieces(["a", "\n", "b", "\n", "c"], delimiter="\n")
    assert [s.text for s in steps] == ["a\n", "b\n", "c"]


# ---------------------------------------------------------------------------
# segment: bad input


def test_empty_text_is_rejected() -> None:
    with pytest.raises(ValueError, match="text"):
        segment("", [], None)


def test_entropy_count_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="entropies"):
        segment("ab", [(0, 1), (1, 2)], [0.1])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_entropies_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="entropies"):
        segment("ab", [(0, 1), (1, 2)], [0.1, bad])


def test_empty_delimiter_is_rejected() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        segment("ab", [(0, 1), (1, 2)], None, delimiter="")


@pytest.mark.parametrize("span", [(-1, 1), (1, 0), (0, 3)])
def test_span_out_of_range_is_rejected(span: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="span"):
        segment("ab", [(0, 1), (1, 2)], None, span=span)


@pytest.mark.parametrize(
    "offsets", [[(0, 1)], [(0, 1), (2, 2)], [(1, 2)], [(0, 2), (1, 2)], [], [(0, 3)]]
)
def test_offsets_that_do_not_tile_the_text_are_rejected(offsets: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError, match="token_offsets"):
        segment("ab", offsets, None)


# ---------------------------------------------------------------------------
# property: steps partition the reasoning, by characters and by tokens

_WORDS = st.sampled_from(["Step", "one", ".", " ", "x", "é", "\n", "\n\n", "\n\n\n", "The"])


@st.composite
def tokenized_texts(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]], tuple[int, int] | None]:
    text = "".join(draw(st.lists(_WORDS, min_size=1, max_size=40)))
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 4))
    bounds = [0, *sorted(cuts), len(text)]
    offsets = list(itertools.pairwise(bounds))
    span = draw(st.none() | st.tuples(st.integers(0, len(text)), st.integers(0, len(text))))
    return text, offsets, None if span is None else (min(span), max(span))


@settings(max_examples=300, deadline=None)
@given(tokenized_texts(), st.data())
def test_steps_partition_reasoning_characters_and_tokens(case, data) -> None:
    text, offsets, span = case
    entropies = data.draw(st.lists(st.floats(0, 12), min_size=len(offsets), max_size=len(offsets)))
    steps = segment(text, offsets, entropies, span=span)
    effective_span = reasoning_span(text) if span is None else span
    assert_partition(text, offsets, steps, effective_span)
    for step in steps:
        own = entropies[step.token_start : step.token_end]
        assert step.entropy_sum == pytest.approx(math.fsum(own))
        assert step.entropy_max == max(own)


@settings(max_examples=200, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=40).map("".join))
def test_split_char_spans_cover_the_text(text: str) -> None:
    spans = split_char_spans(text, 0, len(text))
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(a < b for a, b in spans)
    assert all(DEFAULT_DELIMITER in text[a:b] for a, b in spans[:-1])


# ---------------------------------------------------------------------------
# real byte-level BPE tokenizers

_CORPUS_SENTENCES = [
    "Step one.",
    "The next step adds two.",
    "The sum is four.",
    "Then we check it.",
    "The result holds.",
    "So the value is right.",
    "We add the numbers.",
    "The total is ten.",
    "Now divide by two.",
    "That gives five.",
]


@pytest.fixture(scope="module")
def fusing_bpe():
    """A byte-level BPE trained without a split regex, so it fuses `ĊĊ` with `.` and `The`."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(0)
    corpus = ["\n\n".join(rng.sample(_CORPUS_SENTENCES, 4)) for _ in range(200)]
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def test_segmentation_with_a_bpe_that_fuses_blank_lines(fusing_bpe) -> None:
    text = "Step one.\n\nThe next step adds two.\n\nThe sum is four.\n\nSo the value is right."
    ids = fusing_bpe.encode(text).ids
    pieces = pieces_by_incremental_decode(ids, fusing_bpe.decode)
    assert "".join(pieces) == text
    fused = [i for i, p in enumerate(pieces) if "\n\n" in p and p.strip()]
    assert fused, f"expected a token fusing a blank line with text, got {pieces}"

    offsets = token_char_offsets(pieces)
    steps = segment(text, offsets, [0.1] * len(ids))
    assert_partition(text, offsets, steps, (0, len(text)))
    assert len(steps) == 4
    for token in fused:
        owners = [s for s in steps if s.token_start <= token < s.token_end]
        assert len(owners) == 1
        # the owner is the step the blank line ends: it has content before the blank line
        blank_line_at = offsets[token][0] + pieces[token].index("\n\n")
        assert text[owners[0].char_start : blank_line_at].strip()
    for step in steps:
        assert "".join(pieces[step.token_start : step.token_end]) == step.text


def test_segmentation_with_smollm2_tokenizer(smollm2_tokenizer) -> None:
    text = (
        "Let me compute 12 * 7.\n\n12 * 7 = 84.\n\nCheck: 84 / 7 = 12.\n\n\n"
        "Same again: 84 / 7 = 12.\n\nThe answer is 84."
    )
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    pieces = pieces_by_incremental_decode(ids, smollm2_tokenizer.decode)
    assert "".join(pieces) == text
    offsets = token_char_offsets(pieces)
    span = reasoning_span(text)
    steps = segment(text, offsets, [1.0] * len(ids))
    assert_partition(text, offsets, steps, span)
    assert [s.text.strip() for s in steps] == [
        "Let me compute 12 * 7.",
        "12 * 7 = 84.",
        "Check: 84 / 7 = 12.",
        "Same again: 84 / 7 = 12.",
    ]
    for step in steps:
        assert "".join(pieces[step.token_start : step.token_end]) == step.text
        assert step.entropy_sum == step.n_tokens


# ---------------------------------------------------------------------------
# CRLF line breaks


@pytest.mark.parametrize("delimiter", ["\n\n", "\n"])
def test_crlf_text_is_cut_like_lf_text(delimiter: str) -> None:
    lf = "Add 3 and 4.\n\nThat is 7.\n\nDouble it: 14."
    crlf = lf.replace("\n", "\r\n")
    lf_steps = segment(lf, token_char_offsets(list(lf)), None, delimiter=delimiter)
    crlf_steps = segment(crlf, token_char_offsets(list(crlf)), None, delimiter=delimiter)
    assert len(crlf_steps) == len(lf_steps) == 3
    assert [s.text.replace("\r\n", "\n") for s in crlf_steps] == [s.text for s in lf_steps]
    assert "".join(s.text for s in crlf_steps) == crlf


# ---------------------------------------------------------------------------
# step scores


def _scored(score: str, logprobs=None) -> list[Step]:
    text = "ab\n\ncde\n\nf"
    entropies = [1.0, 2.0, 0.0, 0.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.5]
    return segment(text, token_char_offsets(list(text)), entropies, score=score,
                   sampled_logprobs=logprobs)


def test_sum_score_is_the_entropy_sum_and_the_default() -> None:
    steps = _scored("sum")
    assert [s.score for s in steps] == [s.entropy_sum for s in steps] == [3.0, 9.0, 0.5]


def test_mean_score_is_the_entropy_mean() -> None:
    steps = _scored("mean")
    assert [s.score for s in steps] == pytest.approx([0.75, 1.8, 0.5])


def test_sampled_score_is_the_mean_of_minus_p_log_p_of_the_sampled_token() -> None:
    logprobs = [math.log(0.5)] * 4 + [0.0] * 5 + [-math.inf]
    steps = _scored("sampled", logprobs)
    half = -0.5 * math.log(0.5)
    # step 0: 4 tokens of p=0.5; step 1: p=1 (score 0); step 2: p=0 (the limit, 0).
    assert [s.score for s in steps] == pytest.approx([half, 0.0, 0.0])
    assert steps[0].entropy_sum == 3.0  # the entropy statistics are unchanged


@pytest.mark.parametrize(
    ("score", "logprobs", "message"),
    [("median", None, "score"), ("sampled", None, "sampled_logprobs"),
     ("sampled", [0.0], "sampled_logprobs"), ("sampled", [0.5] * 10, "logprobs")],
)
def test_bad_score_arguments_are_rejected(score, logprobs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _scored(score, logprobs)

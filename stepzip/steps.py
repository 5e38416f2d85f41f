"""Reasoning span, segmentation into steps, and per-step entropy statistics.

Pure logic: no vLLM, FastAPI or torch, so the trainer and the clients can use it.

Reasoning span (``reasoning_span``):

* The reasoning starts just after the first ``think_open`` tag when the text has one
  (before ``think_close``, if that is present), else at 0.
* When ``think_close`` occurs, the reasoning ends at its first occurrence (exclusive).
* A thinking model's trace that never closed (cut off by ``max_tokens``) is reasoning to
  its end: the model is thinking when the caller says so (``thinking=True``: its prompt
  opened the reasoning) or when the text itself holds ``think_open``. Cutting such a
  trace at an answer-like phrase would keep only the steps before the model's first
  tentative answer.
* Otherwise (non-thinking models) the reasoning is everything except a final-answer
  part. That part begins at the start of the line holding the last final-answer marker
  (case-insensitive: ``final answer``, ``the answer is``, ``answer:``, ``\\boxed{``,
  ``####``). When that marker sits on the reasoning's first line there is no separate
  answer line, and the whole text is reasoning. Whitespace (blank lines) before the
  answer line stays in the reasoning.

Steps (``split_char_spans`` and ``segment``):

* A step ends after a maximal run of the delimiter (``\\n\\n`` by default); the run
  belongs to the step it ends. A run is one or more delimiters plus the longest partial
  delimiter right after them, so ``"\\n\\n\\n"`` is one run, not a run and a stray
  ``"\\n"`` opening the next step. A leading run belongs to the first step.
* A whitespace-only piece is not a step of its own: it joins the step before it (or the
  step after it when it comes first).
* Tokens decide the final boundaries: byte-level BPE fuses ``\\n\\n`` with neighbours
  (``.ĊĊ``, ``ĊĊThe``), so a boundary that falls inside a token moves to that token's
  end, and the whole token stays with the step that holds the delimiter. Every token
  overlapping the reasoning then belongs to exactly one step and each step's text is
  exactly the characters of its tokens. Only at the reasoning's outer edges, where a
  token may straddle the span's start or end, is a step's text clipped to the span, so
  the steps' texts always concatenate to the reasoning text.
* Delimiters match line breaks written as ``\r\n`` too, so CRLF text has steps.
* Step entropy is the sum of its tokens' entropies (the paper's definition); the mean
  and max are kept too.

Step score (``Step.score``, what pruning ranks by; ``STEP_SCORES``):

* ``sum``: the sum of the step's token entropies (the paper's equation; the default).
* ``mean``: their mean.
* ``sampled``: the mean over the step's tokens of -p*log p of the sampled token, p from
  its logprob (the paper's released code).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from stepzip.constants import PARAGRAPH_DELIMITER, THINK_CLOSE, THINK_OPEN

DEFAULT_DELIMITER = PARAGRAPH_DELIMITER

STEP_SCORES = ("sum", "mean", "sampled")

_ANSWER_MARKER = re.compile(r"final answer|the answer is|answer:|\\boxed\{|####", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    """One reasoning step: its text, where it sits, and its entropy statistics."""

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    entropy_sum: float
    entropy_mean: float
    entropy_max: float
    score: float | None = None  # what pruning ranks by; None means entropy_sum

    @property
    def n_tokens(self) -> int:
        return self.token_end - self.token_start


def reasoning_span(
    text: str,
    *,
    think_open: str = THINK_OPEN,
    think_close: str = THINK_CLOSE,
    thinking: bool = False,
) -> tuple[int, int]:
    """Return the [start, end) character range of the reasoning in a completion.

    See the module docstring for the rule.
    """
    if not think_open:
        raise ValueError("think_open must be a non-empty string")
    if not think_close:
        raise ValueError("think_close must be a non-empty string")
    close = text.find(think_close)
    open_limit = close if close >= 0 else len(text)
    opened = text.find(think_open, 0, open_limit)
    start = opened + len(think_open) if opened >= 0 else 0
    if close >= 0:
        return start, close
    if thinking or opened >= 0:
        return start, len(text)
    return start, _answer_line_start(text, start)


def _answer_line_start(text: str, start: int) -> int:
    """Start of the final-answer line after ``start``, or len(text) when there is none."""
    markers = list(_ANSWER_MARKER.finditer(text, start))
    if not markers:
        return len(text)
    line_start = text.rfind("\n", start, markers[-1].start()) + 1
    return line_start if line_start > start else len(text)


def token_char_offsets(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Turn per-token decoded pieces into cumulative [start, end) character offsets.

    A token that completes no character (part of a multi-byte UTF-8 sequence) has an
    empty piece and so a zero-width range.
    """
    offsets = []
    position = 0
    for piece in pieces:
        offsets.append((position, position + len(piece)))
        position += len(piece)
    return offsets


def _line_break_tolerant(piece: str) -> str:
    """Regex for ``piece`` where every ``\\n`` also matches a CRLF line break."""
    return "\\r?\\n".join(re.escape(part) for part in piece.split("\n"))


def delimiter_run_pattern(delimiter: str) -> re.Pattern[str]:
    """Regex for a maximal delimiter run, including a trailing partial delimiter."""
    partials = "|".join(
        _line_break_tolerant(delimiter[:size]) for size in range(len(delimiter) - 1, 0, -1)
    )
    tail = f"(?:{partials})?" if partials else ""
    return re.compile(f"(?:{_line_break_tolerant(delimiter)})+{tail}")


def _check_delimiter(delimiter: str) -> None:
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")


def split_char_spans(
    text: str, start: int, end: int, delimiter: str = DEFAULT_DELIMITER
) -> list[tuple[int, int]]:
    """Cut text[start:end] into contiguous step spans after each delimiter run.

    Character-level only; ``segment`` snaps these boundaries to tokens.
    """
    _check_delimiter(delimiter)
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"start/end ({start}, {end}) out of range for text of {len(text)}")
    if start == end:
        return []
    cuts = [
        run.end()
        for run in delimiter_run_pattern(delimiter).finditer(text, start, end)
        if run.start() > start and run.end() < end
    ]
    bounds = [start, *cuts, end]
    pieces = list(itertools.pairwise(bounds))
    return _merge_blank_pieces(text, pieces)


def _merge_blank_pieces(text: str, pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Fold whitespace-only pieces into the previous piece (the next one when first)."""
    merged: list[tuple[int, int]] = []
    for piece_start, piece_end in pieces:
        blank = text[piece_start:piece_end].isspace()
        if merged and (blank or text[merged[-1][0] : merged[-1][1]].isspace()):
            merged[-1] = (merged[-1][0], piece_end)
        else:
            merged.append((piece_start, piece_end))
    return merged


def _check_token_offsets(text: str, token_offsets: Sequence[tuple[int, int]]) -> None:
    """Offsets must tile the whole text in order; zero-width tokens are allowed."""
    position = 0
    for index, (token_start, token_end) in enumerate(token_offsets):
        if token_start != position or token_end < token_start:
            raise ValueError(
                f"token_offsets must be contiguous and cover the text: token {index} is "
                f"({token_start}, {token_end}) but should start at {position}"
            )
        position = token_end
    if position != len(text):
        raise ValueError(
            f"token_offsets must cover the text: they end at {position}, text has {len(text)}"
        )


def _check_entropies(
    entropies: Sequence[float] | None, token_offsets: Sequence[tuple[int, int]]
) -> None:
    if entropies is None:
        return
    if len(entropies) != len(token_offsets):
        raise ValueError(
            f"entropies has {len(entropies)} values but token_offsets has {len(token_offsets)}"
        )
    if not all(math.isfinite(value) for value in entropies):
        raise ValueError("entropies must all be finite")


def _check_span(text: str, span: tuple[int, int]) -> None:
    start, end = span
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"span {span} out of range for text of {len(text)} characters")


def _reasoning_tokens(
    starts: list[int], ends: list[int], start: int, end: int, text_length: int
) -> tuple[int, int]:
    """[first, last) token indices overlapping the reasoning span.

    Zero-width tokens go with the token after them, so those at ``start`` are in and
    those at ``end`` are out, unless nothing follows them (end of text).
    """
    first = bisect.bisect_left(ends, start)
    if first < len(ends) and starts[first] < ends[first] == start:
        first += 1
    last = len(starts) if end == text_length else bisect.bisect_left(starts, end)
    return first, last


def _inside_a_run(position: int, runs: list[tuple[int, int]]) -> bool:
    """Whether ``position`` falls strictly inside one of the delimiter runs."""
    run = bisect.bisect_right(runs, (position, math.inf)) - 1
    return run >= 0 and runs[run][0] < position < runs[run][1]


def _snapped_spans(
    text: str,
    char_spans: list[tuple[int, int]],
    runs: list[tuple[int, int]],
    starts: list[int],
    ends: list[int],
) -> list[tuple[int, int]]:
    """Step spans with each boundary moved out of any token it cuts, to that token's end.

    A boundary that a long token pushes into the middle of a later delimiter run is
    dropped (that run's own boundary takes over), so every step but the last still
    holds a whole run. Snapping can leave a step of nothing but whitespace (the tail
    of a fused token such as ``ĊĊThe`` and a blank line after it); it is folded back
    like any blank piece.
    """
    end = char_spans[-1][1]
    bounds = [char_spans[0][0]]
    for _, cut in char_spans[:-1]:
        token = bisect.bisect_right(starts, cut) - 1
        snapped = min(ends[token] if starts[token] < cut else cut, end)
        if bounds[-1] < snapped < end and not _inside_a_run(snapped, runs):
            bounds.append(snapped)
    bounds.append(end)
    return _merge_blank_pieces(text, list(itertools.pairwise(bounds)))


def _step_stats(
    entropies: Sequence[float] | None, first: int, last: int
) -> tuple[float, float, float]:
    """(sum, mean, max) of a step's token entropies; zeros when there are none."""
    if entropies is None:
        return 0.0, 0.0, 0.0
    values = entropies[first:last]
    total = math.fsum(values)
    return total, total / len(values), max(values)


def sampled_token_score(logprob: float) -> float:
    """-p*log p of a sampled token from its logprob (0 for p = 0, the limit)."""
    if logprob == -math.inf:
        return 0.0
    return -math.exp(logprob) * logprob


def token_scores(
    score: str,
    entropies: Sequence[float] | None,
    sampled_logprobs: Sequence[float] | None,
    n_tokens: int,
) -> Sequence[float] | None:
    """Per-token values a step score is built from (entropies, or -p*log p for sampled)."""
    if score not in STEP_SCORES:
        raise ValueError(f"score {score!r} is not one of {STEP_SCORES}")
    if score != "sampled":
        return entropies
    if sampled_logprobs is None:
        raise ValueError("sampled_logprobs are required for score 'sampled'")
    if len(sampled_logprobs) != n_tokens:
        raise ValueError(
            f"sampled_logprobs has {len(sampled_logprobs)} values for {n_tokens} tokens"
        )
    if any(math.isnan(value) or value > 0.0 for value in sampled_logprobs):
        raise ValueError("sampled_logprobs must be logprobs (<= 0, not NaN)")
    return [sampled_token_score(value) for value in sampled_logprobs]


def _step_score(score: str, values: Sequence[float] | None, first: int, last: int) -> float:
    """Sum (``sum``) or mean (``mean``, ``sampled``) of a step's token values."""
    if values is None or first == last:
        return 0.0
    total = math.fsum(values[first:last])
    return total if score == "sum" else total / (last - first)


def segment(
    text: str,
    token_offsets: Sequence[tuple[int, int]],
    entropies: Sequence[float] | None,
    *,
    delimiter: str = DEFAULT_DELIMITER,
    span: tuple[int, int] | None = None,
    thinking: bool = False,
    score: str = "sum",
    sampled_logprobs: Sequence[float] | None = None,
) -> list[Step]:
    """Cut the reasoning of a completion into steps that agree with its tokens.

    ``token_offsets`` are the completion tokens' character ranges (see
    ``token_char_offsets``); ``entropies`` holds one value per token, or None when
    there are none (statistics are then 0.0). ``span`` defaults to
    ``reasoning_span(text, thinking=thinking)``. ``score`` picks ``Step.score`` (one of
    STEP_SCORES); ``sampled`` needs ``sampled_logprobs``, the logprob of each sampled token.
    """
    if not text:
        raise ValueError("text must be non-empty")
    _check_delimiter(delimiter)
    _check_token_offsets(text, token_offsets)
    _check_entropies(entropies, token_offsets)
    values = token_scores(score, entropies, sampled_logprobs, len(token_offsets))
    start, end = reasoning_span(text, thinking=thinking) if span is None else span
    _check_span(text, (start, end))
    char_spans = split_char_spans(text, start, end, delimiter)
    if not char_spans:
        return []
    starts = [token_start for token_start, _ in token_offsets]
    ends = [token_end for _, token_end in token_offsets]
    runs = [run.span() for run in delimiter_run_pattern(delimiter).finditer(text, start, end)]
    spans = _snapped_spans(text, char_spans, runs, starts, ends)
    first, last = _reasoning_tokens(starts, ends, start, end, len(text))
    keys = [min(max(starts[token], start), end - 1) for token in range(first, last)]
    steps = []
    for index, (char_start, char_end) in enumerate(spans):
        token_start = first + bisect.bisect_left(keys, char_start)
        token_end = first + bisect.bisect_left(keys, char_end)
        total, mean, peak = _step_stats(entropies, token_start, token_end)
        steps.append(
            Step(
                index=index,
                text=text[char_start:char_end],
                char_start=char_start,
                char_end=char_end,
                token_start=token_start,
                token_end=token_end,
                entropy_sum=total,
                entropy_mean=mean,
                entropy_max=peak,
                score=_step_score(score, values, token_start, token_end),
            )
        )
    return steps


def step_token_spans(steps: Sequence[Step]) -> list[tuple[int, int]]:
    """[token_start, token_end) of each step, for callers that only need token ranges."""
    return [(step.token_start, step.token_end) for step in steps]

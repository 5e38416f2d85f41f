"""Pruning variants of a segmented reasoning trace, and their rendering.

Pure logic: no vLLM, FastAPI or torch.

Strategies (``PruneSpec.strategy``):

Steps are ranked by ``Step.score`` (the step entropy sum unless the caller chose
another score, see ``stepzip.steps.STEP_SCORES``).

* ``low``: prune floor(kappa * n_steps) steps with the lowest step entropy (the paper).
* ``high``: the same number with the highest step entropy (the paper's control).
* ``random``: the same number chosen by ``random.Random(seed).sample``.
* ``token``: remove as many individual reasoning tokens as ``low`` would remove, the
  lowest-entropy tokens first (``token_entropies``: the per-token values of the chosen
  score); their characters are deleted, no marker is written.
* ``adaptive``: prune steps whose entropy is below ``threshold``, or the lowest steps
  while their summed entropy stays within ``mass`` of the total.

Ties in entropy break towards the lower index, so every strategy is deterministic.
kappa is read as the decimal it prints as (0.29 of 100 steps is 29, not 28), so binary
rounding never costs a step.

``PruneSpec.paper_code`` (the ``paper-code`` preset, ``stepzip.papercode``) counts
``int(N * kappa)`` as the authors' scripts do and renders their way: every piece
stripped, a pruned step the bare marker, no separator.

Rendering: steps are written in order; a kept step as its exact text, a pruned step as
the marker followed by the delimiter run that ended it (so ``[SKIP]\\n\\n`` per pruned
step, the layout kept and the content dropped). A step that had no such run (the last
one) keeps only its trailing whitespace. With ``merge_runs`` one marker stands for a
whole run of consecutive pruned steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from stepzip import papercode
from stepzip.constants import MARKER
from stepzip.steps import DEFAULT_DELIMITER, Step, delimiter_run_pattern

DEFAULT_MARKER = MARKER
STRATEGIES = ("low", "high", "random", "token", "adaptive")


@dataclass(frozen=True)
class PruneSpec:
    """Which steps (or tokens) to prune and how to mark them."""

    strategy: str = "low"  # one of STRATEGIES
    ratio: float | None = 0.8  # kappa in [0, 1]: share of steps pruned (low/high/random/token)
    seed: int = 0  # random strategy
    threshold: float | None = None  # adaptive: prune steps with a score below this
    mass: float | None = None  # adaptive: share in [0, 1] of the total score to remove
    marker: str = DEFAULT_MARKER
    merge_runs: bool = False  # one marker per run of consecutive pruned steps
    paper_code: bool = False  # the authors' count and join (stepzip.papercode)


@dataclass(frozen=True)
class Compressed:
    """One compressed variant of a reasoning trace and what it removed."""

    spec: PruneSpec
    pruned: tuple[int, ...]  # pruned step indices, sorted (none for "token")
    kept: tuple[int, ...]  # kept step indices in order (all for "token")
    pruned_tokens: tuple[int, ...]  # completion token indices removed, sorted
    text: str  # the compressed reasoning
    n_steps: int
    n_skipped: int  # pruned steps (0 for "token")
    n_markers: int  # markers written (fewer than n_skipped with merge_runs)
    tokens_before: int  # reasoning tokens
    tokens_kept: int  # reasoning tokens left

    @property
    def reduction(self) -> float:
        """Fraction of reasoning tokens removed (0.0 for an empty reasoning)."""
        if self.tokens_before == 0:
            return 0.0
        return 1.0 - self.tokens_kept / self.tokens_before


def _is_unit_fraction(value: float) -> bool:
    return not math.isnan(value) and 0.0 <= value <= 1.0


def validate_spec(spec: PruneSpec) -> None:
    """Reject a spec that cannot be applied, naming the offending field."""
    if spec.strategy not in STRATEGIES:
        raise ValueError(f"strategy {spec.strategy!r} is not one of {STRATEGIES}")
    if not spec.marker:
        raise ValueError("marker must be a non-empty string")
    if spec.ratio is not None and not _is_unit_fraction(spec.ratio):
        raise ValueError(f"ratio {spec.ratio} must be in [0, 1]")
    if spec.paper_code and spec.merge_runs:
        raise ValueError("merge_runs does not apply to paper-code (skips are joined bare)")
    if spec.strategy == "adaptive":
        _validate_adaptive(spec)
    elif spec.ratio is None:
        raise ValueError(f"ratio is required for strategy {spec.strategy!r}")


def _validate_adaptive(spec: PruneSpec) -> None:
    if (spec.threshold is None) == (spec.mass is None):
        raise ValueError("adaptive needs exactly one of threshold or mass")
    if spec.threshold is not None and math.isnan(spec.threshold):
        raise ValueError("threshold must not be NaN")
    if spec.mass is not None and not _is_unit_fraction(spec.mass):
        raise ValueError(f"mass {spec.mass} must be in [0, 1]")


def _prune_count(ratio: float, n_steps: int, paper_code: bool = False) -> int:
    """floor(kappa * n), with kappa taken as the decimal it prints as (paper-code: the
    float product truncated)."""
    if paper_code:
        return papercode.prune_count(n_steps, ratio)
    return math.floor(Fraction(str(ratio)) * n_steps)


def step_score(step: Step) -> float:
    """What a step is ranked by: its score, or its entropy sum when it has none."""
    return step.entropy_sum if step.score is None else step.score


def _ascending(steps: Sequence[Step]) -> list[int]:
    """Step indices by score, lowest first, ties to the lower index."""
    return sorted(range(len(steps)), key=lambda i: (step_score(steps[i]), i))


def _descending(steps: Sequence[Step]) -> list[int]:
    """Step indices by score, highest first, ties to the lower index."""
    return sorted(range(len(steps)), key=lambda i: (-step_score(steps[i]), i))


def _adaptive_selection(steps: Sequence[Step], spec: PruneSpec) -> list[int]:
    """Steps below the threshold, or the lowest ones whose summed score fits the mass."""
    if spec.threshold is not None:
        return [i for i, step in enumerate(steps) if step_score(step) < spec.threshold]
    order = _ascending(steps)
    removed = list(itertools.accumulate(step_score(steps[i]) for i in order))
    budget = spec.mass * removed[-1] if removed else 0.0
    return [i for i, cumulative in zip(order, removed) if cumulative <= budget]


def select_steps(steps: Sequence[Step], spec: PruneSpec) -> tuple[int, ...]:
    """Sorted indices of the steps ``spec`` prunes (none for the token strategy)."""
    validate_spec(spec)
    if spec.strategy == "token":
        return ()
    if spec.strategy == "adaptive":
        return tuple(sorted(_adaptive_selection(steps, spec)))
    count = _prune_count(spec.ratio, len(steps), spec.paper_code)
    if spec.strategy == "random":
        chosen = random.Random(spec.seed).sample(range(len(steps)), count)
    elif spec.strategy == "high":
        chosen = _descending(steps)[:count]
    elif spec.paper_code:
        chosen = papercode.lowest([step_score(step) for step in steps], count)
    else:
        chosen = _ascending(steps)[:count]
    return tuple(sorted(chosen))


def _separator_tail(text: str, run_pattern: re.Pattern[str]) -> str:
    """The delimiter run that ended a step, with any whitespace after it.

    A boundary snapped to a fused token (``ĊĊThe``) leaves a little content after the
    run; that content is dropped. Without a run, the step's trailing whitespace.
    """
    runs = [run for run in run_pattern.finditer(text) if run.start() > 0]
    if not runs:
        return text[len(text.rstrip()) :]
    after = text[runs[-1].end() :]
    return runs[-1].group() + (after if after.isspace() else "")


def _render_steps(
    steps: Sequence[Step], pruned: set[int], spec: PruneSpec, delimiter: str
) -> tuple[str, int]:
    """Compressed reasoning text and the number of markers written."""
    if spec.paper_code:
        return papercode.join([s.text for s in steps], pruned, spec.marker), len(pruned)
    run_pattern = delimiter_run_pattern(delimiter)
    parts = []
    markers = 0
    for index, step in enumerate(steps):
        if index not in pruned:
            parts.append(step.text)
            continue
        continues_run = spec.merge_runs and index + 1 in pruned
        if not continues_run:
            parts.append(spec.marker + _separator_tail(step.text, run_pattern))
            markers += 1
    return "".join(parts), markers


def _step_tokens(steps: Sequence[Step], indices: Sequence[int]) -> tuple[int, ...]:
    return tuple(t for i in indices for t in range(steps[i].token_start, steps[i].token_end))


def _compress_steps(steps: Sequence[Step], spec: PruneSpec, delimiter: str) -> Compressed:
    pruned = select_steps(steps, spec)
    pruned_set = set(pruned)
    kept = tuple(i for i in range(len(steps)) if i not in pruned_set)
    text, markers = _render_steps(steps, pruned_set, spec, delimiter)
    return Compressed(
        spec=spec,
        pruned=pruned,
        kept=kept,
        pruned_tokens=_step_tokens(steps, pruned),
        text=text,
        n_steps=len(steps),
        n_skipped=len(pruned),
        n_markers=markers,
        tokens_before=sum(step.n_tokens for step in steps),
        tokens_kept=sum(steps[i].n_tokens for i in kept),
    )


def _compress_tokens(
    steps: Sequence[Step],
    spec: PruneSpec,
    token_entropies: Sequence[float] | None,
    token_offsets: Sequence[tuple[int, int]] | None,
    text: str | None,
) -> Compressed:
    """Token-level baseline: the same token budget as ``low``, spent on single tokens."""
    if token_entropies is None:
        raise ValueError("token_entropies is required for the token strategy")
    if token_offsets is None:
        raise ValueError("token_offsets is required for the token strategy")
    if text is None:
        raise ValueError("text is required for the token strategy")
    if len(token_entropies) != len(token_offsets):
        raise ValueError("token_entropies and token_offsets differ in length")
    low = dataclasses.replace(spec, strategy="low")
    budget = len(_step_tokens(steps, select_steps(steps, low)))
    reasoning = range(steps[0].token_start, steps[-1].token_end)
    by_entropy = sorted(reasoning, key=lambda t: (token_entropies[t], t))
    removed = tuple(sorted(by_entropy[:budget]))
    return Compressed(
        spec=spec,
        pruned=(),
        kept=tuple(range(len(steps))),
        pruned_tokens=removed,
        text=_delete_tokens(text, token_offsets, removed, steps[0].char_start, steps[-1].char_end),
        n_steps=len(steps),
        n_skipped=0,
        n_markers=0,
        tokens_before=len(reasoning),
        tokens_kept=len(reasoning) - len(removed),
    )


def _delete_tokens(
    text: str,
    token_offsets: Sequence[tuple[int, int]],
    removed: Sequence[int],
    start: int,
    end: int,
) -> str:
    """text[start:end] without the characters of the removed tokens (clipped to it)."""
    parts = []
    position = start
    for token in removed:
        token_start, token_end = token_offsets[token]
        parts.append(text[position : max(position, token_start)])
        position = max(position, min(token_end, end))
    parts.append(text[position:end])
    return "".join(parts)


def compress(
    steps: Sequence[Step],
    spec: PruneSpec,
    *,
    token_entropies: Sequence[float] | None = None,
    token_offsets: Sequence[tuple[int, int]] | None = None,
    text: str | None = None,
    delimiter: str = DEFAULT_DELIMITER,
) -> Compressed:
    """Build one compressed variant of ``steps`` as ``spec`` says.

    ``token_entropies``, ``token_offsets`` and ``text`` (the completion the steps came
    from) are needed by the token strategy only; ``delimiter`` must be the one the steps
    were cut at, so that a pruned step keeps its blank line.
    """
    validate_spec(spec)
    if not steps:
        return Compressed(spec, (), (), (), "", 0, 0, 0, 0, 0)
    if spec.strategy == "token":
        return _compress_tokens(steps, spec, token_entropies, token_offsets, text)
    return _compress_steps(steps, spec, delimiter)

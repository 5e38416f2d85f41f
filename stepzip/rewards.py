"""The GRPO reward of the step-entropy paper (Li et al., arXiv 2508.03346), as parts.

Reward = correctness + skip ratio + skip count + length; every number lives in
``RewardConfig`` and every component can be switched off, because the paper's ablation
(correctness + skip ratio alone collapses accuracy) is worth reproducing.

TRL decodes completions with ``skip_special_tokens=True``: a ``[SKIP]`` added as a special
token vanishes from the text, so skips can be counted from the completion's token ids.

Only the reasoning counts: markers after ``think_close`` (in the answer) are not skips,
or the skip reward could be earned without pruning anything. Steps are counted by the
same rule that cuts a trace into steps for pruning (``stepzip.steps.split_char_spans``).

``RewardConfig.paper_code`` scores by the authors' released script instead
(``stepzip.papercode``): the same tiers and penalties, but skips and ``\n\n`` counted in
the text before the first ``</think>`` (all but its last character without one), the
length re-encoded from the text, correctness by math-verify on the text from
``</think>`` on. The default's counts differ on purpose: steps are counted as pruning
cuts them, and an unclosed completion earns neither skips nor correctness.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepzip import papercode
from stepzip.config import option
from stepzip.constants import MARKER, PARAGRAPH_DELIMITER, THINK_CLOSE
from stepzip.grader import grade, grade_many
from stepzip.steps import split_char_spans
from stepzip.tokens import token_pieces

COMPONENTS = ("correctness", "skip_ratio", "skip_count", "length")

TokenIds = Sequence[int]
RewardFunc = Callable[..., list[float]]


@dataclass(frozen=True)
class RewardConfig:
    """Weights and thresholds of the reward; defaults are the paper's."""

    correctness: bool = option(True, "reward: correctness component on")
    correct_reward: float = option(2.0, "reward for a correct answer after the reasoning")
    skip_ratio: bool = option(True, "reward: skip-ratio component on")
    skip_ratio_high: float = option(0.8, "skip ratio of the high tier")
    skip_ratio_high_reward: float = option(1.0, "reward of the high tier")
    skip_ratio_mid: float = option(0.5, "skip ratio of the middle tier")
    skip_ratio_mid_reward: float = option(0.5, "reward of the middle tier")
    skip_count: bool = option(True, "reward: skip-count component on")
    max_skips: int = option(100, "markers allowed before the penalty")
    too_many_skips_penalty: float = option(-2.0, "penalty for more than --max-skips markers")
    length: bool = option(True, "reward: length component on")
    max_completion_tokens: int = option(3500, "tokens allowed before the length penalty")
    too_long_penalty: float = option(-1.0, "penalty for a longer completion")
    marker: str = option(MARKER, "skip marker")
    think_close: str = option(THINK_CLOSE, "tag that ends the reasoning")
    step_delimiter: str = option(PARAGRAPH_DELIMITER, "step delimiter, escapes allowed")
    paper_code: bool = option(False, "score by the authors' released reward script "
                                     "(stepzip.papercode; --preset paper-code sets it)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_ratio_mid <= self.skip_ratio_high <= 1.0:
            raise ValueError(
                "need 0 <= skip_ratio_mid <= skip_ratio_high <= 1, got "
                f"skip_ratio_mid={self.skip_ratio_mid}, skip_ratio_high={self.skip_ratio_high}"
            )
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")
        if self.max_completion_tokens < 1:
            raise ValueError(
                f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}"
            )
        for name in ("marker", "think_close", "step_delimiter"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be non-empty")

    def enabled(self) -> tuple[str, ...]:
        """Names of the switched-on components, in COMPONENTS order."""
        return tuple(name for name in COMPONENTS if getattr(self, name))


def count_skips(
    text: str | None,
    completion_ids: TokenIds | None = None,
    skip_token_id: int | None = None,
    marker: str = MARKER,
    *,
    think_close: str = THINK_CLOSE,
    decode: Callable[[list[int]], str] | None = None,
) -> int:
    """Number of skip markers in a completion's reasoning (before ``think_close``).

    With ``skip_token_id`` and ``completion_ids`` the ids are counted too and the larger
    count wins: ids see a special-token marker that decoding dropped, text sees a marker
    the model spelled out in pieces; the two never see the same marker twice over.
    ``decode`` (ids -> text, special tokens kept) locates ``think_close`` among the ids;
    without it every id counts, which is right only for completions without an answer.
    """
    in_text = split_completion(text, think_close)[0].count(marker) if text else 0
    if skip_token_id is None or completion_ids is None:
        return in_text
    ids = _reasoning_ids(list(completion_ids), decode, think_close)
    in_ids = sum(1 for token in ids if token == skip_token_id)
    return max(in_text, in_ids)


def _reasoning_ids(
    ids: list[int], decode: Callable[[list[int]], str] | None, think_close: str
) -> list[int]:
    """The ids before the token where ``think_close`` starts (all of them without it)."""
    if decode is None or not ids:
        return ids
    pieces = token_pieces(decode, ids)
    close = "".join(pieces).find(think_close)
    if close < 0:
        return ids
    position = 0
    for index, piece in enumerate(pieces):
        if position + len(piece) > close:
            return ids[:index]
        position += len(piece)
    return ids


def count_steps(reasoning: str, delimiter: str = PARAGRAPH_DELIMITER) -> int:
    """Steps of the reasoning, cut as pruning cuts them (``split_char_spans``): a delimiter
    run ends a step and blank pieces are no steps; a step holding only a marker counts."""
    spans = split_char_spans(reasoning, 0, len(reasoning), delimiter)
    return sum(1 for start, end in spans if reasoning[start:end].strip())


def skip_ratio(
    reasoning: str, n_skips: int, delimiter: str = PARAGRAPH_DELIMITER, marker: str = MARKER
) -> float:
    """#skips / #steps including skips (0 when there are no steps).

    Steps are counted with the markers removed and the skips added back, so the ratio is
    the same whether the text kept its markers or decoding dropped them.
    """
    n_steps = count_steps(reasoning.replace(marker, ""), delimiter) + n_skips
    return n_skips / n_steps if n_steps else 0.0


def split_completion(completion: str, think_close: str = THINK_CLOSE) -> tuple[str, str | None]:
    """(reasoning, answer part); the answer part is None when reasoning never closed."""
    reasoning, closed, answer = completion.partition(think_close)
    return reasoning, answer if closed else None


def correctness_reward(completion: str, gold: str | None, cfg: RewardConfig) -> float:
    """``correct_reward`` when the answer after ``think_close`` matches the gold, else 0.

    Only the text after the reasoning counts, so an answer guessed mid-reasoning and never
    committed to earns nothing; so does a completion that never closes its reasoning.
    """
    _, answer = split_completion(completion, cfg.think_close)
    if answer is None or gold is None:
        return 0.0
    # Bounded (a child process with a deadline): an answer the policy wrote to stall
    # sympy is ungradable, which earns nothing, instead of hanging the run.
    return cfg.correct_reward if grade(answer, gold).outcome == "correct" else 0.0


def correctness_rewards(completions: Sequence[str], golds: Sequence[str | None],
                        cfg: RewardConfig) -> list[float]:
    """``correctness_reward`` over a batch, graded concurrently as one grading batch: a
    hostile gold costs its K completions a few deadlines, not K."""
    answers = [split_completion(c, cfg.think_close)[1] for c in completions]
    todo = [i for i, (a, g) in enumerate(zip(answers, golds, strict=True))
            if a is not None and g is not None]
    rewards = [0.0] * len(completions)
    for i, g in zip(todo, grade_many([(answers[i], golds[i]) for i in todo]), strict=True):
        rewards[i] = cfg.correct_reward if g.outcome == "correct" else 0.0
    return rewards


def skip_ratio_reward(ratio: float, cfg: RewardConfig) -> float:
    """Tiered reward for compressing: high tier at >= skip_ratio_high, mid tier at
    >= skip_ratio_mid, nothing below."""
    if ratio >= cfg.skip_ratio_high:
        return cfg.skip_ratio_high_reward
    if ratio >= cfg.skip_ratio_mid:
        return cfg.skip_ratio_mid_reward
    return 0.0


def skip_count_reward(n_skips: int, cfg: RewardConfig) -> float:
    """Penalty for more than ``max_skips`` markers: stops the ratio being gamed by
    emitting a flood of empty skip steps."""
    return cfg.too_many_skips_penalty if n_skips > cfg.max_skips else 0.0


def length_reward(n_tokens: int, cfg: RewardConfig) -> float:
    """Penalty for completions longer than ``max_completion_tokens``."""
    return cfg.too_long_penalty if n_tokens > cfg.max_completion_tokens else 0.0


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """Text of a TRL completion: a string, or a chat message list (its last message)."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content")
    return content if isinstance(content, str) else ""


def skip_token_id_of(tokenizer: Any, marker: str) -> int | None:
    """The marker's id when the tokenizer holds it as a single token, else None."""
    if tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(marker)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(token_id)


def make_trl_reward_funcs(cfg: RewardConfig, tokenizer: Any = None) -> list[RewardFunc]:
    """One TRL reward function per enabled component, each named after its component
    (TRL logs rewards by ``__name__``), so GRPO sums them into the paper's reward.

    Gold answers come from the dataset column ``answer``. With a ``tokenizer`` a
    ``[SKIP]`` special token is counted from ``completion_ids``; lengths come from
    ``completion_ids`` (or, without them, from the tokenizer).
    """
    skip_id = skip_token_id_of(tokenizer, cfg.marker)
    decode = None if tokenizer is None else (
        lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def skips(text: str, ids: TokenIds | None) -> int:
        return count_skips(text, ids, skip_id, cfg.marker, think_close=cfg.think_close,
                           decode=decode)

    def n_tokens(text: str, ids: TokenIds | None) -> int:
        if ids is not None:
            return len(ids)
        if tokenizer is None:
            raise ValueError("length reward needs completion_ids or a tokenizer")
        return len(tokenizer.encode(text, add_special_tokens=False))

    def ratio(text: str, ids: TokenIds | None) -> float:
        reasoning, _ = split_completion(text, cfg.think_close)
        return skip_ratio(reasoning, skips(text, ids), cfg.step_delimiter, cfg.marker)

    scorers: dict[str, Callable[[str, TokenIds | None, str | None], float]] = {
        # correctness: graded per batch (_trl_correctness_func)
        "skip_ratio": lambda text, ids, gold: skip_ratio_reward(ratio(text, ids), cfg),
        "skip_count": lambda text, ids, gold: skip_count_reward(skips(text, ids), cfg),
        "length": lambda text, ids, gold: length_reward(n_tokens(text, ids), cfg),
    }
    if cfg.paper_code:
        scorers = paper_code_scorers(cfg, tokenizer)
        return [_trl_reward_func(name, scorers[name]) for name in cfg.enabled()]
    return [_trl_correctness_func(cfg) if name == "correctness"
            else _trl_reward_func(name, scorers[name]) for name in cfg.enabled()]


def paper_code_scorers(
    cfg: RewardConfig, tokenizer: Any = None
) -> dict[str, Callable[[str, TokenIds | None, str | None], float]]:
    """The four components by the authors' script (``stepzip.papercode``), from the text
    alone: their script never saw token ids. The length needs the tokenizer."""

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise ValueError("the paper-code length reward re-encodes text: give a tokenizer")
        return tokenizer.encode(text)

    marker, close = cfg.marker, cfg.think_close
    return {
        "correctness": lambda text, ids, gold: (
            cfg.correct_reward if papercode.is_correct(text, gold, close) else 0.0),
        "skip_ratio": lambda text, ids, gold: skip_ratio_reward(
            papercode.skip_ratio(text, marker, close), cfg),
        "skip_count": lambda text, ids, gold: skip_count_reward(
            papercode.skip_count(text, marker, close), cfg),
        "length": lambda text, ids, gold: length_reward(
            papercode.completion_length(text, encode), cfg),
    }


def _trl_reward_func(
    name: str, score: Callable[[str, TokenIds | None, str | None], float]
) -> RewardFunc:
    """Wrap a per-completion scorer in TRL's batch signature."""

    def reward(
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[TokenIds] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        golds = _golds(kwargs, len(completions), required=name == "correctness")
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        return [
            score(completion_text(c), i, g) for c, i, g in zip(completions, ids, golds, strict=True)
        ]

    reward.__name__ = reward.__qualname__ = name
    return reward


def _trl_correctness_func(cfg: RewardConfig) -> RewardFunc:
    """The correctness component in TRL's batch signature, graded as one batch."""

    def correctness(prompts: Sequence[Any], completions: Sequence[Any],
                    completion_ids: Sequence[TokenIds] | None = None,
                    **kwargs: Any) -> list[float]:
        golds = _golds(kwargs, len(completions), required=True)
        return correctness_rewards([completion_text(c) for c in completions], golds, cfg)

    return correctness


def _golds(kwargs: Mapping[str, Any], n: int, *, required: bool) -> Sequence[str | None]:
    """The ``answer`` column, one entry per completion."""
    if "answer" not in kwargs:
        if required:
            raise ValueError("correctness reward needs the dataset column 'answer'")
        return [None] * n
    golds = kwargs["answer"]
    if len(golds) != n:
        raise ValueError(f"'answer' has {len(golds)} entries for {n} completions")
    return golds

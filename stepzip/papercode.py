"""The ``paper-code`` preset: the rules of the authors' released scripts, on purpose.

Pure logic: no vLLM, FastAPI or torch. The paper's figures were made with the authors'
scripts (GitHub ``staymylove/COT_Compresstion_via_Step_entropy``; ``PAPER_CODE.md`` in
the project's shared notes lists what they do). Where they differ from the paper's
equations, stepzip's default follows the equations and this module follows the scripts,
so a user can reproduce the paper's *numbers*. Each rule, with why the default differs:

Traces
  Sampled at temperature 0.6, top-p 0.95 (``TEMPERATURE``, ``TOP_P``); the user message
  puts the problem under a "[Math Problem]" header and asks for the answer in
  ``\\boxed{}`` (``USER_TEMPLATE``, in our words). The default samples greedily (T 0,
  reproducible) with a plain "Answer step by step" prompt. The length limit stays the
  caller's: the scripts asked for 32,768 tokens, which needs a model length to match
  (``--max-tokens 32768``).

Token score
  -p*log p of the *sampled* token, p = exp(its logprob) (``stepzip.steps.
  sampled_token_score``), not the entropy of the model's full next-token distribution
  (the paper's equation and the default): one term of the entropy sum stands in for it.
  The logprob is the server's; the scripts read ``vllm serve``'s, which are raw (before
  temperature and top-p) in vLLM's default mode, so a paper-code run wants ``stepzip
  serve --logprobs-mode raw_logprobs`` (stepzip's default mode is processed, for TRL's
  importance sampling; a server in another mode says so in the response's notes,
  ``LOGPROBS_NOTE``).

Steps
  Reasoning is the tokens before the first ``</think>`` (``reasoning_tokens``). A step
  ends at a token whose text is exactly ``\\n\\n`` (``DELIMITER_TOKEN``; stepzip compares
  the tokenizer's *decoded* pieces, which is what a server returning the byte-level
  spelling ``ĊĊ`` compares with ``ĊĊ``). A blank line merged into a neighbouring token
  (``.\\n\\n``, ``\\n\\nThe``) or spelled as two ``\\n`` tokens does not split; the default
  splits at every blank line by characters and snaps to tokens. The delimiter token ends
  its step's text but its score is not counted; consecutive delimiters make a step that
  is the delimiter alone, score 0 (the default folds blank pieces into a neighbour).
  Text after the last delimiter is a last step.

Step score
  The mean of its tokens' scores (the default: the sum of entropies, the paper's
  equation).

Duplicates
  Steps are keyed by their text stripped of surrounding whitespace: identical texts
  collapse into one step at the position of the first, with the score of the last
  (``dedup``). All delimiter-only steps are one step (key ``""``). The default keeps
  every step: a repeated step is still a step the model wrote.

Pruning
  ``int(N * kappa)`` steps (float product, truncated: 0.7 * 10 is 7, but 0.29 * 100 is
  28), N counting the steps left after the collapse, lowest scores first by a stable
  ascending sort (``prune_count``). The default reads kappa as the decimal it prints
  as (0.29 of 100 is 29), so binary rounding never costs a step.

Compressed text
  Every piece stripped; a pruned step is the literal marker; pieces joined with no
  separator (``join``), so skips read ``[SKIP][SKIP]`` and kept steps run into each
  other. The default keeps each step's text and blank line, writing ``[SKIP]\\n\\n``.

Answer from a compressed trace
  The compressed reasoning, then ``\\n</think>\\n\\n`` (``ANSWER_SUFFIX``), sampled at
  temperature 0.6 (the default answers greedily, for reproducible grading).

SFT (``SFT``)
  Loss on the whole sequence, prompt included; LoRA alpha 16; learning rate 2e-5;
  ``[SKIP]`` not added to the vocabulary (spelled in ordinary tokens). The default masks
  the prompt (the model should learn to write reasoning, not problems) and makes the
  marker one token (cheap to write, exact to count).

GRPO (``GRPO``)
  Temperature 0.6, learning rate 1e-5, 100 warm-up steps, weight decay 0.01, max grad
  norm 1.0, LoRA r 16 / alpha 32 / dropout 0.05, no KL coefficient set (objective
  ``trl``: the installed TRL's loss and KL defaults; the default objective is plain GRPO
  with KL 0.04 to the base), a system prompt that tells the model to write ``[SKIP]``
  for redundant steps (``GRPO_SYSTEM``, in our words) before the problem alone
  (``GRPO_TEMPLATE``). K stays 14 (the paper's text; their script used 8). Their
  512-token prompt limit is not applied (stepzip does not truncate prompts).

Rewards
  * skip ratio = skips / (occurrences of ``\\n\\n`` + skips), both counted in the text
    before the first ``</think>``, or in the whole text less its last character when
    there is none (their slice with index -1); denominator 1 when both counts are 0
    (``skip_ratio``). The default counts steps as pruning cuts them and only in closed
    reasoning.
  * skip count: more than 100 markers in that same text (``skip_count``).
  * length: the completion re-encoded by the tokenizer (``encode(text)``, special tokens
    as the tokenizer adds them); the default counts the sampled ids.
  * correctness: the text from ``</think>`` on (the last character when there is none)
    parsed by math-verify and compared with the gold (``answer_part``,
    ``parsed_answer_matches``). The authors compared ``str`` of math-verify's last parse
    result with the gold by the ``competition_math`` string metric; the preset compares
    with math-verify's ``verify`` (no download; ``\\frac12`` equals 0.5), run through
    ``stepzip.grader`` with a deadline: an ungradable answer is not correct. The default
    grades the text after ``</think>`` only, by stepzip's extractor.

A model without ``</think>`` (not a thinking model): its reasoning ends where stepzip's
plain-model reasoning ends (before the final-answer line; the scripts would run to the
end of the text, answer included), and it answers after the plain ``The answer is`` cue
(``NO_THINK_NOTE``): ``\\n</think>\\n\\n`` means nothing to such a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from stepzip.constants import MARKER, THINK_CLOSE
from stepzip.steps import Step, reasoning_span, sampled_token_score, token_char_offsets

PRESET = "paper-code"
PRESETS = ("default", PRESET)

TEMPERATURE = 0.6
TOP_P = 0.95
ANSWER_TEMPERATURE = 0.6
DELIMITER_TOKEN = "\n\n"
ANSWER_SUFFIX = f"\n{THINK_CLOSE}\n\n"
STEP_SCORE = "sampled"  # stepzip.steps.STEP_SCORES: mean of -p*log p of the sampled token
USER_TEMPLATE = (
    "[Math Problem]\n\n{problem}\n\n"
    "Solve the problem step by step and put your final answer within \\boxed{{}}."
)
GRPO_SYSTEM = (
    "You are an expert at solving mathematical problems. Reason concisely: replace every "
    "intermediate step that is redundant, self-evident or can be left out without losing "
    f"what the solution needs with the token {MARKER}."
)
GRPO_TEMPLATE = "{problem}"  # their GRPO prompt: the system text, then the problem alone
RAW_LOGPROBS = "raw_logprobs"  # vLLM's default mode, what a plain `vllm serve` returns
LOGPROBS_NOTE = (
    "paper-code: this server reports processed logprobs (after temperature and top-p); "
    "the authors' scripts read vLLM's default raw ones, so token scores differ: "
    "start it with --logprobs-mode raw_logprobs"
)
NO_THINK_NOTE = (
    "paper-code: this model has no </think>; its reasoning ends before the final-answer "
    "line (as for any plain model) and it answers after the 'The answer is' cue instead "
    "of '\\n</think>\\n\\n'"
)

SFT: dict[str, Any] = {"completion_only_loss": False, "lora_alpha": 16,
                       "learning_rate": 2e-5, "skip_token": "none"}
GRPO: dict[str, Any] = {"temperature": TEMPERATURE, "learning_rate": 1e-5,
                        "warmup_steps": 100, "weight_decay": 0.01, "max_grad_norm": 1.0,
                        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                        "objective": "trl", "system": GRPO_SYSTEM,
                        "prompt_template": GRPO_TEMPLATE}


def rules() -> dict[str, Any]:
    """The preset's rules, as recorded in run summaries."""
    return {
        "preset": PRESET,
        "sampling": {"temperature": TEMPERATURE, "top_p": TOP_P},
        "user_template": USER_TEMPLATE,
        "token_score": "-p*log p of the sampled token, p = exp(logprob), logprobs raw "
                       "(stepzip serve --logprobs-mode raw_logprobs)",
        "step_split": "a token whose text is exactly '\\n\\n' ends a step (not counted)",
        "step_score": "mean",
        "dedup": "by stripped text: position of the first, score of the last",
        "prune_count": "int(N * kappa), stable ascending",
        "join": f"pieces stripped, pruned -> {MARKER}, no separator",
        "answer": {"suffix": ANSWER_SUFFIX, "temperature": ANSWER_TEMPERATURE},
        "sft": SFT,
        "grpo": GRPO,
        "rewards": "skip ratio skips/(count('\\n\\n') + skips) before the first </think> "
                   "(text[:-1] without one); skip count in that text; length re-encoded; "
                   "correctness: math-verify of text from </think> on (last char without)",
        "no_think_close": NO_THINK_NOTE,
    }


# ---- steps --------------------------------------------------------------------------


def reasoning_tokens(pieces: Sequence[str], end: int) -> int:
    """How many leading tokens end at or before character ``end`` (the reasoning's end:
    the first ``</think>``, or a plain model's final-answer line)."""
    count = 0
    for _, token_end in token_char_offsets(pieces):
        if token_end > end:
            break
        count += 1
    return count


def reasoning_end(text: str, think_close: str = THINK_CLOSE) -> int:
    """Where the reasoning ends: the first ``think_close``, else the end of the text."""
    close = text.find(think_close)
    return len(text) if close < 0 else close


def raw_steps(pieces: Sequence[str], scores: Sequence[float]) -> list[tuple[int, int, float]]:
    """(first token, end token, mean score) of each step, before the collapse.

    A ``DELIMITER_TOKEN`` ends its step (its score left out); a step with no other token
    scores 0; tokens after the last delimiter are a last step.
    """
    steps, start, values = [], 0, []
    for index, piece in enumerate(pieces):
        if piece != DELIMITER_TOKEN:
            values.append(scores[index])
            continue
        steps.append((start, index + 1, math.fsum(values) / len(values) if values else 0.0))
        start, values = index + 1, []
    if start < len(pieces):
        steps.append((start, len(pieces), math.fsum(values) / len(values) if values else 0.0))
    return steps


def segment(pieces: Sequence[str], logprobs: Sequence[float],
            entropies: Sequence[float] | None = None, *, n_reasoning: int | None = None
            ) -> list[Step]:
    """The reasoning's steps by the scripts' rules, collapsed by stripped text.

    ``pieces`` and ``logprobs`` are the completion's tokens (decoded text, sampled
    logprob); ``n_reasoning`` how many of them are reasoning (default: those before the
    first ``</think>``). Each Step keeps the first occurrence's text and tokens (its
    entropy statistics from ``entropies`` when given) and the last occurrence's score.
    """
    if len(logprobs) != len(pieces):
        raise ValueError(f"logprobs has {len(logprobs)} values for {len(pieces)} tokens")
    if n_reasoning is None:
        n_reasoning = reasoning_tokens(pieces, reasoning_end("".join(pieces)))
    pieces = pieces[:n_reasoning]
    scores = [sampled_token_score(value) for value in logprobs[:n_reasoning]]
    offsets = token_char_offsets(pieces)
    first: dict[str, tuple[int, int]] = {}
    last_score: dict[str, float] = {}
    for start, end, score in raw_steps(pieces, scores):
        key = "".join(pieces[start:end]).strip()
        first.setdefault(key, (start, end))
        last_score[key] = score
    return [_step(index, pieces, offsets, entropies, span, last_score[key])
            for index, (key, span) in enumerate(first.items())]


def trace_steps(pieces: Sequence[str], logprobs: Sequence[float],
                entropies: Sequence[float] | None = None, *, thinking: bool = True
                ) -> tuple[int, list[Step]]:
    """(characters of reasoning, steps) of a completion: a thinking model's reasoning ends
    at its first ``</think>``; a plain model's before its final-answer line
    (``NO_THINK_NOTE``)."""
    text = "".join(pieces)
    end = reasoning_end(text) if thinking else reasoning_span(text, thinking=False)[1]
    n_reasoning = reasoning_tokens(pieces, end)
    steps = segment(pieces, logprobs, entropies, n_reasoning=n_reasoning)
    return len("".join(pieces[:n_reasoning])), steps


def _step(index: int, pieces: Sequence[str], offsets: Sequence[tuple[int, int]],
          entropies: Sequence[float] | None, span: tuple[int, int], score: float) -> Step:
    start, end = span
    values = list(entropies[start:end]) if entropies is not None else []
    total = math.fsum(values)
    return Step(index=index, text="".join(pieces[start:end]), char_start=offsets[start][0],
                char_end=offsets[end - 1][1], token_start=start, token_end=end,
                entropy_sum=total, entropy_mean=total / len(values) if values else 0.0,
                entropy_max=max(values) if values else 0.0, score=score)


# ---- pruning ------------------------------------------------------------------------


def prune_count(n_steps: int, ratio: float) -> int:
    """int(N * kappa): the float product, truncated."""
    return int(n_steps * ratio)


def lowest(scores: Sequence[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (stable ascending sort: ties by position)."""
    return sorted(range(len(scores)), key=lambda i: scores[i])[:count]


def join(texts: Sequence[str], pruned: set[int], marker: str = MARKER) -> str:
    """Stripped pieces, each pruned one the marker, joined with no separator."""
    return "".join(marker if i in pruned else text.strip() for i, text in enumerate(texts))


def answer_prompt(reasoning_prompt: str, compressed: str) -> str:
    """Prompt that makes a thinking model answer from a compressed trace."""
    return f"{reasoning_prompt}{compressed}{ANSWER_SUFFIX}"


# ---- rewards ------------------------------------------------------------------------


def thinking_text(completion: str, think_close: str = THINK_CLOSE) -> str:
    """Text before the first ``think_close``; without one, all but the last character."""
    return completion[:completion.find(think_close)]


def skip_count(completion: str, marker: str = MARKER, think_close: str = THINK_CLOSE) -> int:
    return thinking_text(completion, think_close).count(marker)


def skip_ratio(completion: str, marker: str = MARKER, think_close: str = THINK_CLOSE) -> float:
    """skips / (``\\n\\n`` occurrences + skips) in ``thinking_text``; denominator 1 at 0."""
    thinking = thinking_text(completion, think_close)
    skips = thinking.count(marker)
    return skips / ((thinking.count(DELIMITER_TOKEN) + skips) or 1)


def completion_length(completion: str, encode: Callable[[str], Sequence[int]]) -> int:
    """Tokens of the completion re-encoded (``encode`` as the tokenizer encodes text)."""
    return len(encode(completion))


def answer_part(completion: str, think_close: str = THINK_CLOSE) -> str:
    """Text from the first ``think_close`` on; the last character when there is none."""
    return completion[completion.find(think_close):]


def parsed_answer_matches(answer: str, gold: str) -> bool:
    """math-verify: ``answer`` parsed equals ``gold`` parsed. Unbounded (sympy): run it
    through ``stepzip.grader``, never on the caller's thread."""
    from math_verify import parse, verify

    parsed = parse(answer, parsing_timeout=None)
    if not parsed:
        return False
    return bool(verify(parse(f"${gold}$", parsing_timeout=None), parsed, timeout_seconds=None))


def is_correct(completion: str, gold: str | None, think_close: str = THINK_CLOSE,
               timeout: float | None = None) -> bool:
    """The correctness rule, bounded: an answer that cannot be graded in time is wrong."""
    from stepzip import grader

    if gold is None:
        return False
    try:
        return bool(grader.call(parsed_answer_matches, answer_part(completion, think_close),
                                gold, timeout=timeout))
    except Exception:  # noqa: BLE001 - timeout, crash or a math-verify error: ungradable
        return False

"""Answer extraction and grading for math problems.

Pure logic (no vLLM, FastAPI or torch) so the server, the trainer's rewards and the
evaluation clients grade identically. Equivalence is decided by math_verify, with its
signal-based timeouts switched off because the server grades from worker threads, where
``signal.alarm`` cannot be used.
"""

from __future__ import annotations

import re
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

# Without a timeout, sympy work is bounded only by input size; answers longer than this
# are not answers but runaway text, and are refused rather than parsed.
MAX_ANSWER_CHARS = 1000

_BOXED_OPENER = re.compile(r"\\boxed\s*\{")
_GSM8K_MARKER = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# Digit groups split by ",", "{,}" or ",\!"; not right inside brackets, where a comma
# separates coordinates: (12,102).
_THOUSANDS = re.compile(r"(?<![\d,.(\[])\d{1,3}(?:(?:,\\!|\{,\}|,)\d{3})+(?![\d,)\]])")
_SEPARATOR = re.compile(r",\\!|\{,\}|,")
_NUMBER_WITH_UNITS = re.compile(r"^(-?[\d.]+(?:/\d+)?)\s+[A-Za-z][A-Za-z\s]*$")


def extract_answer(text: str) -> str | None:
    """Return the final answer a completion commits to, normalised, or None.

    Priority follows how explicit the commitment is: the last ``\\boxed{...}``, then a
    GSM8K-style ``#### X``, then "the (final) answer is X", then the last number.
    """
    if not isinstance(text, str):
        return None
    for candidate in (
        _last_boxed(text),
        _last_group(_GSM8K_MARKER, text),
        _answer_is_phrase(text),
        _last_number(text),
    ):
        if candidate is not None:
            normalised = normalize_answer(candidate)
            if normalised:
                return normalised
    return None


def normalize_answer(answer: str) -> str:
    """Strip presentation (dollar signs, trailing period, bold, thousands separators)
    that would make equal answers compare unequal as strings."""
    answer = answer.strip().replace("\\$", "").replace("$", "")
    answer = answer.strip().strip("*").strip()
    answer = answer.rstrip(".").strip()
    return _THOUSANDS.sub(lambda m: _SEPARATOR.sub("", m.group(0)), answer)


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` equals ``gold`` mathematically (``\\frac12`` == ``0.5``).

    Never raises: junk on either side is simply not a match.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    pred_n, gold_n = _comparable(pred), _comparable(gold)
    if not pred_n or not gold_n or max(len(pred_n), len(gold_n)) > MAX_ANSWER_CHARS:
        return False
    if pred_n == gold_n:
        return True
    try:
        gold_parsed, pred_parsed = _parse(gold_n), _parse(pred_n)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))
    except Exception:  # noqa: BLE001 sympy raises many kinds on junk; junk is a mismatch
        return False


def grade(completion: str, gold: str | None) -> tuple[str | None, bool | None]:
    """Return (extracted answer, correct); correct is None when there is no gold."""
    extracted = extract_answer(completion)
    if gold is None:
        return extracted, None
    return extracted, answers_match(extracted, gold)


def gold_from_gsm8k(answer_field: str) -> str:
    """The gold answer of a GSM8K record: the text after its last ``####``."""
    match = _last_group(_GSM8K_MARKER, answer_field)
    if match is None:
        raise ValueError(f"answer_field has no '#### ' gold marker: {answer_field[-80:]!r}")
    return normalize_answer(match)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance (nesting allowed)."""
    for opener in reversed(list(_BOXED_OPENER.finditer(text))):
        content = _balanced_content(text, opener.end())
        if content is not None:
            return content
    return None


def _balanced_content(text: str, start: int) -> str | None:
    """Text from ``start`` up to the brace closing the one just before it."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _last_group(pattern: re.Pattern[str], text: str) -> str | None:
    """First group of the last match of ``pattern`` with a non-blank group."""
    for match in reversed(list(pattern.finditer(text))):
        if match.group(1).strip():
            return match.group(1)
    return None


def _answer_is_phrase(text: str) -> str | None:
    """What follows the last "the answer is", up to the end of that sentence."""
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        phrase = text[match.end() :].split("\n", 1)[0]
        end = _SENTENCE_END.search(phrase)
        phrase = phrase[: end.start()] if end else phrase
        if phrase.strip():
            return phrase
    return None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _comparable(answer: str) -> str:
    """Normalised answer with trailing unit words dropped ("18 dollars" -> "18")."""
    answer = normalize_answer(answer)
    units = _NUMBER_WITH_UNITS.match(answer)
    return units.group(1) if units else answer


@lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    """math_verify parse of a bare answer; boxing it makes LaTeX extraction take the whole
    string (``\\frac12``, ``p - q``) instead of hunting for an anchor in it."""
    boxed = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    parsed = parse(boxed, extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)
    if not parsed:
        parsed = parse(answer, extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)
    return tuple(parsed)

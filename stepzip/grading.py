"""Answer extraction and grading for math problems.

Pure logic (no vLLM, FastAPI or torch) so the server, the trainer's rewards and the
evaluation clients grade identically. Equivalence is decided by math_verify, with its
signal-based timeouts switched off because the server grades from worker threads, where
``signal.alarm`` cannot be used.

Readings that the text alone cannot settle are decided when comparing, not when
extracting:

* A plain comma between digit groups (``100,200``) is a thousands separator or a list
  separator; answers match when they agree under either reading (``100,200`` matches
  ``100200`` and ``100, 200``). LaTeX's ``{,}`` and ``,\\!`` are always thousands.
* Trailing unit words are dropped (``18 dollars``, ``7 km/h``), but a single letter or a
  mathematical word (``5 x``, ``2 pi``) is part of the answer, not a unit.
* ``#### X`` (GSM8K) counts only when X is a number; ``#### Final Answer`` is a heading.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
# math_verify warns on every call that its timeouts are off; they are off on purpose.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# Without a timeout, sympy work is bounded only by input size; answers longer than this
# are not answers but runaway text, and are refused rather than parsed.
MAX_ANSWER_CHARS = 1000

_BOXED_OPENER = re.compile(r"\\boxed\s*\{")
_GSM8K_MARKER = re.compile(r"####[ \t]*([^\n]*)")
# What a GSM8K-style "#### X" must hold to be an answer rather than a Markdown heading:
# a number, optionally with a currency sign, unit words and a closing period.
_GSM8K_ANSWER = re.compile(r"\$?\s*-?\d[\d,]*(?:\.\d+)?(?:/\d+)?(?:\s+[A-Za-z][A-Za-z/ ]*)?\s*\.?\s*")
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# Digit groups split by ",", "{,}" or ",\!"; not right inside brackets, where a comma
# separates coordinates: (12,102).
_THOUSANDS = re.compile(r"(?<![\d,.(\[])\d{1,3}(?:(?:,\\!|\{,\}|,)\d{3})+(?![\d,)\]])")
_LATEX_THOUSANDS = re.compile(r"(?<![\d,.(\[])\d{1,3}(?:(?:,\\!|\{,\})\d{3})+(?![\d,)\]])")
_SEPARATOR = re.compile(r",\\!|\{,\}|,")
_LIST_COMMA = re.compile(r"(?<=\d),(?=-?\d)")
# A unit: a word of two or more letters, possibly compound (km/h, m^2); several may follow.
_NUMBER_WITH_UNITS = re.compile(
    r"^(-?[\d.]+(?:/\d+)?)((?:\s+[A-Za-z]{2,}(?:[/^][A-Za-z0-9]+)*)+)\s*$")
# Words that make a number an expression, not a quantity with a unit.
_MATH_WORDS = frozenset(
    {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "inf",
     "infty", "infinity", "mod", "deg", "degrees", "or", "and", "times", "div"})


def extract_answer(text: str) -> str | None:
    """Return the final answer a completion commits to, normalised, or None.

    Priority follows how explicit the commitment is: the last ``\\boxed{...}``, then a
    GSM8K-style ``#### X``, then "the (final) answer is X", then the last number.
    """
    if not isinstance(text, str):
        return None
    for candidate in (
        _last_boxed(text),
        _gsm8k_answer(text),
        _answer_is_phrase(text),
        _last_number(text),
    ):
        if candidate is not None:
            normalised = normalize_answer(candidate, plain_commas=False)
            if normalised:
                return normalised
    return None


def normalize_answer(answer: str, *, plain_commas: bool = True) -> str:
    """Strip presentation (dollar signs, trailing period, bold, thousands separators)
    that would make equal answers compare unequal as strings.

    ``plain_commas=False`` keeps a plain comma between digit groups (it may separate
    list items); only LaTeX thousands separators go then.
    """
    answer = answer.strip().replace("\\$", "").replace("$", "")
    answer = answer.strip().strip("*").strip()
    answer = answer.rstrip(".").strip()
    pattern = _THOUSANDS if plain_commas else _LATEX_THOUSANDS
    return pattern.sub(lambda m: _SEPARATOR.sub("", m.group(0)), answer)


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` equals ``gold`` mathematically (``\\frac12`` == ``0.5``).

    Never raises: junk on either side is simply not a match.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if max(len(pred), len(gold)) > MAX_ANSWER_CHARS:
        return False
    pairs = dict.fromkeys(zip(_readings(pred), _readings(gold), strict=True))
    return any(_same(pred_n, gold_n) for pred_n, gold_n in pairs)


def _same(pred_n: str, gold_n: str) -> bool:
    """Whether two comparable forms are equal, as strings or mathematically."""
    if not pred_n or not gold_n:
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


def _gsm8k_answer(text: str) -> str | None:
    """The last ``#### X`` whose X is a number (a Markdown heading is not an answer)."""
    for match in reversed(list(_GSM8K_MARKER.finditer(text))):
        if _GSM8K_ANSWER.fullmatch(match.group(1)):
            return match.group(1)
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


def _readings(answer: str) -> tuple[str, str]:
    """The answer's comparable forms: plain commas as thousands separators, and as list
    separators (spaced, so math_verify reads a list, not one number)."""
    as_written = _without_units(normalize_answer(answer, plain_commas=False))
    return _without_units(normalize_answer(answer)), _LIST_COMMA.sub(", ", as_written)


def _without_units(answer: str) -> str:
    """The answer with trailing unit words dropped ("18 dollars", "7 km/h" -> "18", "7");
    a mathematical word is no unit ("2 pi" stays)."""
    units = _NUMBER_WITH_UNITS.match(answer)
    if units is None:
        return answer
    words = re.split(r"[\s/^]+", units.group(2).strip().lower())
    return answer if _MATH_WORDS.intersection(words) else units.group(1)


@lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    """math_verify parse of a bare answer; boxing it makes LaTeX extraction take the whole
    string (``\\frac12``, ``p - q``) instead of hunting for an anchor in it."""
    boxed = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    parsed = parse(boxed, extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)
    if not parsed:
        parsed = parse(answer, extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)
    return tuple(parsed)

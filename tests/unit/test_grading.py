"""Answer extraction and equivalence grading (stepzip.grading)."""

from __future__ import annotations

import threading

import pytest

from stepzip.grading import answers_match, extract_answer, gold_from_gsm8k, grade


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x = \boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{1{,}234}", "1234"),
        # A plain comma stays: thousands or list is decided when comparing.
        ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1,234"),
        ("#### -5", "-5"),
        ("The answer is 42.", "42"),
        ("so the final answer is: $18.", "18"),
        ("The answer is 3.5. Let me double-check: yes.", "3.5"),
        ("The answer is **-12**", "-12"),
        (r"The answer is \frac{3}{4}", r"\frac{3}{4}"),
        ("The answer is 7. Wait, no: the answer is 8.", "8"),
        ("She spends $1,234.50 in total", "1,234.50"),
        ("from 5-3 we get -7", "-7"),
        ("so 3/4 of them", "3/4"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_markdown_heading_is_not_a_gsm8k_answer() -> None:
    text = "### Step 1\n3+4=7\n\n#### Final Answer\nThe answer is 14."
    assert grade(text, "14") == ("14", True)
    assert extract_answer("#### 1. Set up\nso x = 3") == "3"
    assert extract_answer("#### 72 dollars.") == "72 dollars"


def test_boxed_outranks_later_answer_phrase() -> None:
    assert extract_answer(r"\boxed{5} ... the answer is 6") == "5"


def test_unbalanced_boxed_falls_back_to_earlier_one() -> None:
    assert extract_answer(r"\boxed{9} and then \boxed{1 + {2") == "9"


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac12", "0.5"),
        ("3/4", "0.75"),
        (r"\frac{3}{4}", "3/4"),
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("-3", "-3.0"),
        ("-3.0", "-3"),
        (r"\boxed{7}", "7"),
        ("$18", "18"),
        ("18 dollars", "18"),
        ("7 km/h", "7"),
        ("12 square meters", "12"),
        ("100,200", "100200"),
        ("100,200", "100, 200"),
        ("1,000", "1{,}000"),
        (r"2\sqrt{3}", r"\sqrt{12}"),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
    ],
)
def test_equivalent_answers_match(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("2", "3"),
        ("-3", "3"),
        ("0.5", "0.51"),
        ("1,000", "1"),
        ("2 pi", "2"),
        ("5 x", "5"),
        ("100,200", "100"),
        ("100,200", "200, 100, 5"),
        ("6 - 5i", "5"),
        (r"(2,12) \cup (12,102)", r"(2,12) \cup (12102)"),
    ],
)
def test_different_answers_do_not_match(pred: str, gold: str) -> None:
    assert not answers_match(pred, gold)


@pytest.mark.parametrize(
    "junk", [None, "", "   ", "}{", r"\boxed{", "{{{", "\\", "x" * 5000, "\x00\x01", "∞∞∞"]
)
def test_junk_never_raises_and_never_matches(junk: str | None) -> None:
    assert answers_match(junk, "42") is False


def test_junk_gold_is_not_a_match() -> None:
    assert answers_match("42", "}{") is False


def test_grade_returns_extracted_and_verdict() -> None:
    assert grade("The answer is 42.", "42") == ("42", True)
    assert grade(r"thus \boxed{\frac{1}{2}}", "0.5") == (r"\frac{1}{2}", True)
    assert grade("The answer is 41.", "42") == ("41", False)
    assert grade("nothing", "42") == (None, False)


def test_grade_without_gold_has_no_verdict() -> None:
    assert grade("The answer is 42.", None) == ("42", None)


@pytest.mark.parametrize(
    ("field", "gold"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
        ("So 1000 + 234 = 1,234\n#### 1,234", "1234"),
        ("#### -7", "-7"),
    ],
)
def test_gold_from_gsm8k(field: str, gold: str) -> None:
    assert gold_from_gsm8k(field) == gold


def test_gold_from_gsm8k_without_marker_names_the_argument() -> None:
    with pytest.raises(ValueError, match="answer_field"):
        gold_from_gsm8k("no marker here")


def test_grading_works_outside_the_main_thread() -> None:
    """math_verify's default signal-based timeout fails in worker threads."""
    results: list[tuple[str | None, bool | None]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            # values used nowhere else, so no cached parse hides the thread's own work
            results.append(grade(r"so \boxed{\frac{5}{8}}", "0.625"))
            results.append(grade(r"so \boxed{\frac{5}{9}}", "0.625"))
        except BaseException as e:  # noqa: BLE001 reported to the main thread
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors
    assert results == [(r"\frac{5}{8}", True), (r"\frac{5}{9}", False)]

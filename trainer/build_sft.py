"""Stage 1: (problem, compressed CoT) pairs for SFT, built by the server's /v1/compress.

For every problem the server writes a full reasoning trace, prunes its lowest-entropy
steps (kappa = 0.8 by default) to the marker, and answers from the compressed reasoning.
A pair is kept when that answer is still correct (``keep="correct"``) or always
(``keep="all"``; the embedded 135M model almost never answers correctly).

The SFT completion is ``<compressed reasoning>\\n</think>\\n\\n<answer>``: the GRPO
reward grades only what follows ``</think>``, so the model learns to close its
reasoning with that tag whether or not its chat template is a thinking one. For a
non-thinking model the answer is "The answer is ..." (the cue the server answered from).

Output, all beside ``--output``:

* ``<output>``: one JSON object per kept pair (``prompt``, ``completion`` and
  provenance); ``prompt`` is the rendered prompt the server generated from.
* ``<output stem>.dropped.jsonl``: one line per problem processed but not kept, with
  the reason, so a rerun does not ask again.
* ``<output stem>.summary.json``: counts and mean token reduction (replaced atomically).
* ``<output stem>.dataset/``: every kept pair as a Hugging Face dataset (``save_to_disk``;
  rewritten whole at the end of each run) in TRL's conversational prompt-completion
  format: ``prompt`` the system and user messages, ``completion`` the assistant message,
  plus ``id``, ``gold``, ``reduction``, ``delimiter``, ``marker`` and ``think_close``.
  ``SFTTrainer`` (and ``stepzip train sft --data``) take it as it is; TRL then renders
  it with the model's chat template, where the JSONL keeps the server's rendered prompt.

Resumable and never lossy: each finished batch is appended with a single write and
fsync'd; a torn last line (a crash mid-write) is cut off on the next start; the ids in
both files are the finished ones, and a rerun skips them. A crash between the two files'
writes only makes the rerun ask again for that batch's dropped problems, which are not
in the pair file, so no row is lost or duplicated.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepzip.constants import ANSWER_CUE as PLAIN_ANSWER_CUE
from stepzip.constants import THINK_CLOSE, THINK_OPEN
from trainer.config import BuildSftConfig, unescape

# ---- pure pieces -------------------------------------------------------------------------


def is_thinking_prompt(prompt: str) -> bool:
    """The server opens a thinking model's reasoning with <think> in the prompt."""
    return prompt.rstrip().endswith(THINK_OPEN)


def answer_line(answer_text: str | None, *, thinking: bool, gold: str | None,
                answer_from: str) -> str | None:
    """The answer part of the SFT completion (None when there is none to write)."""
    if answer_from == "gold":
        return None if gold is None else f"{PLAIN_ANSWER_CUE} {gold}."
    text = (answer_text or "").strip()
    if thinking:
        return text or None
    # A plain model answered after the cue "The answer is" (stop at the line end).
    return f"{PLAIN_ANSWER_CUE} {text}".rstrip() if text else None


def format_completion(compressed: str, answer: str, think_close: str = THINK_CLOSE) -> str:
    """``<compressed reasoning>\\n</think>\\n\\n<answer>`` (no EOS: TRL appends it)."""
    return f"{compressed.rstrip()}\n{think_close}\n\n{answer.strip()}"


def pairs_from_result(result: dict[str, Any], cfg: BuildSftConfig, delimiter: str,
                      question: str, source: str) -> tuple[list[dict], str | None]:
    """Kept rows of one problem of a CompressResponse (as JSON), or ([], reason)."""
    rows: list[dict] = []
    reasons: list[str] = []
    thinking = is_thinking_prompt(result["prompt"])
    for trace in result["traces"]:
        variant = trace["variants"][0]
        compressed = variant.get("compressed_text") or ""
        if not compressed.strip() or not variant.get("n_steps"):
            reasons.append("empty")
            continue
        if cfg.keep == "correct" and not variant.get("correct"):
            reasons.append("incorrect")
            continue
        if cfg.answer_from == "model" and variant.get("answer_finish_reason") == "length":
            # The answer ran out of tokens: a cut-off answer must not become a target.
            reasons.append("answer-cut-off")
            continue
        answer = answer_line(variant.get("answer_text"), thinking=thinking,
                             gold=result.get("gold"), answer_from=cfg.answer_from)
        if answer is None:
            reasons.append("no-answer")
            continue
        rows.append({
            "id": result["id"] if len(result["traces"]) == 1
            else f"{result['id']}#{trace['sample']}",
            "problem_id": result["id"],
            "sample": trace["sample"],
            "prompt": result["prompt"],
            "completion": format_completion(compressed, answer, cfg.think_close),
            "question": question,
            "gold": result.get("gold"),
            "source": source,
            "correct": variant.get("correct"),
            "extracted_answer": variant.get("extracted_answer"),
            "full_correct": trace.get("correct"),
            "tokens_before": variant["tokens_before"],
            "tokens_after": variant["tokens_after"],
            "reduction": variant["reduction"],
            "n_steps": variant["n_steps"],
            "n_skipped": variant["n_skipped"],
            "ratio": variant.get("ratio"),
            "strategy": variant.get("strategy"),
            "delimiter": delimiter,
            "marker": cfg.marker,
            "think_close": cfg.think_close,
            "thinking": thinking,
        })
    return rows, (None if rows else ",".join(sorted(set(reasons))) or "empty")


def conversation(row: dict, cfg: BuildSftConfig) -> dict:
    """A pair in TRL's conversational prompt-completion format: the messages the server
    rendered its prompt from, and the completion as the assistant's message (a thinking
    model's with the opening tag its prompt ended with)."""
    from stepzip.prompts import DEFAULT_TEMPLATE
    from stepzip.schemas.compress import CompressionOptions

    # The template the request carried once validated (a preset may supply one).
    template = CompressionOptions(prompt_template=cfg.prompt_template,
                                  preset=_preset(cfg)).prompt_template
    user = (template or DEFAULT_TEMPLATE).format(problem=row["question"])
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    opener = f"{THINK_OPEN}\n" if row["thinking"] else ""
    return {
        "prompt": [*system, {"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": opener + row["completion"]}],
        **{k: row[k] for k in DATASET_COLUMNS},
    }


# Provenance kept beside the messages; `stepzip train sft` reads its settings from them.
DATASET_COLUMNS = ("id", "gold", "reduction", "delimiter", "marker", "think_close")


def write_dataset(rows: Sequence[dict], folder: Path, cfg: BuildSftConfig) -> None:
    """All kept pairs as a `datasets` folder, replaced whole (save_to_disk, then rename)."""
    import shutil

    from datasets import Dataset

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    Dataset.from_list([conversation(r, cfg) for r in rows]).save_to_disk(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def within_length(rows: Sequence[dict], count_tokens: Callable[[str], int],
                  max_length: int) -> tuple[list[dict], int]:
    """(rows whose prompt + completion + EOS fit ``max_length`` tokens, number dropped).

    Over-long pairs are dropped, not truncated: truncation would cut ``</think>``, the
    answer and EOS off the target (the paper drops traces over 4,096 tokens).
    """
    # Counted part by part, as TRL tokenizes a prompt-completion pair.
    kept = [r for r in rows
            if count_tokens(r["prompt"]) + count_tokens(r["completion"]) + 1 <= max_length]
    return kept, len(rows) - len(kept)


# ---- the append-only store ---------------------------------------------------------------


class JsonlLog:
    """Append-only JSONL: one write + fsync per batch; a torn tail is cut on open."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = _cut_torn_tail(path)
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
        return out

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)


def _cut_torn_tail(path: Path) -> int:
    """Truncate a last line that lacks its newline or is not valid JSON; bytes cut."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        # A complete-looking last line can still be garbage only if it was torn and
        # then a newline happened to land; check it parses.
        start = data.rfind(b"\n", 0, max(0, keep - 1)) + 1
        last = data[start:keep].strip()
        if last:
            try:
                json.loads(last)
            except ValueError:
                keep = start
    if keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sidecar(output: Path, suffix: str) -> Path:
    stem = output.name.removesuffix(".jsonl")
    return output.with_name(f"{stem}.{suffix}")


# ---- the run -----------------------------------------------------------------------------


@dataclass
class BuildSftStats:
    total: int = 0
    already_done: int = 0
    processed: int = 0
    kept: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    failed_batches: int = 0
    kept_total: int = 0
    mean_reduction_kept: float | None = None
    mean_reduction_run: float | None = None
    tokens_before_kept: int = 0
    tokens_after_kept: int = 0
    correct_run: int = 0
    delimiter: str | None = None
    seconds: float = 0.0
    repaired_bytes: int = 0


def compress_request(problems: Sequence[Any], cfg: BuildSftConfig) -> Any:
    """The CompressRequest for one batch of stepzip.data.Problem."""
    from stepzip.schemas import compress as schemas

    return schemas.CompressRequest(
        problems=[schemas.Problem(text=p.question, id=p.id, answer=p.answer) for p in problems],
        sampling=schemas.Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p, seed=cfg.seed, n=cfg.samples),
        variants=[schemas.VariantSpec(strategy=cfg.strategy, ratio=cfg.ratio)],
        answer=True, answer_max_tokens=cfg.answer_max_tokens,
        delimiter=unescape(cfg.delimiter), marker=cfg.marker,
        prompt_template=cfg.prompt_template, system=cfg.system, preset=_preset(cfg))


def _preset(cfg: BuildSftConfig) -> str:
    from stepzip import papercode

    return papercode.PRESET if cfg.paper_code else "default"


def score_request(problems: Sequence[Any], reasoning_by_id: dict[str, str],
                  cfg: BuildSftConfig) -> Any:
    """The ScoreRequest for one batch of problems whose reasoning exists (--traces)."""
    from stepzip.schemas import compress, score

    return score.ScoreRequest(
        pairs=[score.Pair(problem=p.question, reasoning=reasoning_by_id[p.id], id=p.id,
                          answer=p.answer) for p in problems],
        variants=[compress.VariantSpec(strategy=cfg.strategy, ratio=cfg.ratio)],
        answer=True, answer_max_tokens=cfg.answer_max_tokens,
        delimiter=unescape(cfg.delimiter), marker=cfg.marker,
        prompt_template=cfg.prompt_template, system=cfg.system, preset=_preset(cfg))


def build_sft(cfg: BuildSftConfig, *, client: Any = None, problems: Sequence[Any] | None = None,
              log: Callable[[str], None] = print) -> BuildSftStats:
    """Run (or resume) the build; returns the counts. `client` is a StepzipClient
    (made from cfg.url when None); `problems` overrides the dataset. With cfg.traces the
    server scores the given reasoning instead of generating it."""
    from clients.client import StepzipClient, StepzipError
    from stepzip.data import load_problems, load_traces

    started = time.perf_counter()
    output = Path(cfg.output)
    pairs_log = JsonlLog(output)
    dropped_log = JsonlLog(sidecar(output, "dropped.jsonl"))
    stats = BuildSftStats(repaired_bytes=pairs_log.repaired_bytes + dropped_log.repaired_bytes)
    if stats.repaired_bytes:
        log(f"cut a torn last line ({stats.repaired_bytes} bytes) left by an interrupted run")

    reasoning_by_id: dict[str, str] = {}
    if problems is None and cfg.traces:
        traces = load_traces(cfg.traces, limit=cfg.limit)
        problems = [t.problem for t in traces]
        reasoning_by_id = {t.problem.id: t.reasoning for t in traces}
    if problems is None:
        problems = load_problems(cfg.dataset, cfg.split, limit=cfg.limit, offset=cfg.offset,
                                 **cfg.fields())
    by_id = {p.id: p for p in problems}
    if len(by_id) != len(problems):
        raise ValueError("problem ids are not unique")
    kept_rows = pairs_log.read()
    done = {r["problem_id"] for r in kept_rows} | {r["problem_id"] for r in dropped_log.read()}
    todo = [p for p in problems if p.id not in done]
    stats.total, stats.already_done = len(problems), len(problems) - len(todo)
    log(f"build-sft: {len(problems)} problems, {stats.already_done} already done, "
        f"{len(todo)} to compress -> {output}")

    own_client = client is None
    if own_client:
        client = StepzipClient(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout)
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    run_reductions: list[float] = []
    bar = _progress(len(todo), cfg.progress)

    def work(batch: list) -> dict:
        if reasoning_by_id:  # same response shape: the rest of the build is unchanged
            request, send = score_request(batch, reasoning_by_id, cfg), client.score_request
        else:
            request, send = compress_request(batch, cfg), client.compress_request
        for attempt in range(cfg.retries + 1):
            try:
                return send(request).model_dump(mode="json")
            except StepzipError as exc:
                if exc.status < 500 or attempt == cfg.retries:
                    raise
            except Exception as exc:  # transport errors
                if attempt == cfg.retries or not _is_transport_error(exc):
                    raise
            time.sleep(min(30.0, 2.0 ** attempt))
        raise AssertionError("unreachable")

    def finish(batch: list, response: dict) -> None:
        stats.delimiter = response["delimiter"]
        new_rows, new_dropped = [], []
        for result in response["results"]:
            problem = by_id[result["id"]]
            for trace in result["traces"]:
                run_reductions.append(trace["variants"][0]["reduction"])
                stats.correct_run += bool(trace["variants"][0].get("correct"))
            rows, reason = pairs_from_result(result, cfg, response["delimiter"],
                                             problem.question, problem.source)
            if rows:
                new_rows += rows
            else:
                new_dropped.append({"problem_id": result["id"], "reason": reason})
                stats.dropped_by_reason[reason] = stats.dropped_by_reason.get(reason, 0) + 1
        pairs_log.append(new_rows)
        dropped_log.append(new_dropped)
        kept_rows.extend(new_rows)
        stats.processed += len(batch)
        stats.kept += len({r["problem_id"] for r in new_rows})
        stats.dropped += len(new_dropped)
        bar.update(len(batch))
        bar.set_postfix(kept=stats.kept, dropped=stats.dropped)
        if not cfg.progress:  # no bar: one line per batch, so a long build is never silent
            log(f"build-sft: {stats.processed}/{len(todo)} problems compressed, {stats.kept} "
                f"kept ({time.perf_counter() - started:.0f} s)")

    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
            pending: dict[Future, list] = {}
            queue = list(batches)
            while queue or pending:
                while queue and len(pending) < max(1, cfg.concurrency):
                    batch = queue.pop(0)
                    pending[pool.submit(work, batch)] = batch
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    batch = pending.pop(future)
                    try:
                        finish(batch, future.result())
                    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                        # Nothing of this batch was written: a rerun asks again.
                        stats.failed_batches += 1
                        log(f"batch of {len(batch)} failed: {type(exc).__name__}: {exc}")
    finally:
        bar.close()
        if own_client:
            client.close()

    stats.kept_total = len(kept_rows)
    if kept_rows:
        stats.mean_reduction_kept = _mean(r["reduction"] for r in kept_rows)
        stats.tokens_before_kept = sum(r["tokens_before"] for r in kept_rows)
        stats.tokens_after_kept = sum(r["tokens_after"] for r in kept_rows)
    if run_reductions:
        stats.mean_reduction_run = _mean(run_reductions)
    if kept_rows:
        write_dataset(kept_rows, sidecar(output, "dataset"), cfg)
    stats.seconds = time.perf_counter() - started
    write_json_atomic(sidecar(output, "summary.json"),
                      {"config": asdict(cfg), "stats": asdict(stats)})
    log(summary_line(stats))
    return stats


def summary_line(s: BuildSftStats) -> str:
    red = "n/a" if s.mean_reduction_kept is None else f"{100 * s.mean_reduction_kept:.1f}%"
    red_run = "n/a" if s.mean_reduction_run is None else f"{100 * s.mean_reduction_run:.1f}%"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.dropped_by_reason.items())) or "-"
    return (f"build-sft: {s.total} problems; this run {s.processed} processed, {s.kept} kept, "
            f"{s.dropped} dropped ({reasons}), {s.failed_batches} failed batches; "
            f"{s.already_done} were done before; {s.kept_total} pairs in total; "
            f"mean token reduction {red} (kept pairs), {red_run} (all traces this run); "
            f"{s.correct_run} correct after compression this run; {s.seconds:.1f} s")


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _is_transport_error(exc: Exception) -> bool:
    import httpx

    return isinstance(exc, httpx.TransportError)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="problem", desc="build-sft", file=sys.stderr,
                disable=not enabled or total == 0)

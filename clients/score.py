"""`stepzip score`: score existing reasoning traces in bulk through /v1/score.

    stepzip score --input traces.jsonl --output scored/ --url http://a:8000 --url http://b:8000

Each input line is one trace: ``problem`` (or ``question``), the reasoning as text
(``reasoning``, encoded by the server's tokenizer) or as the model's token ids
(``reasoning_ids``, exact), optional gold ``answer`` and ``id`` (default: the file's stem
and line number). Batches of ``--batch-size`` traces go to the servers (several ``--url``s:
each request to the least-loaded replica, StepzipClient's rule), ``--concurrency`` at a
time; a progress bar shows traces done and scored tokens/s.

Outputs in ``--output``:

* ``scored.jsonl``: one row per trace (``id``, ``problem``, ``gold``, ``prompt``,
  ``delimiter``, ``trace``: the /v1/score trace with its per-token ids and entropies,
  steps and the compressed variant), appended with one write and an fsync per batch.
  A rerun skips the ids already there and cuts a torn last line a kill left, so a run
  killed at any point and rerun scores every trace exactly once.
* ``sft.jsonl``: the compressed SFT pairs (``stepzip train build-sft``'s rows), rebuilt
  whole from ``scored.jsonl`` at the end of every run, so they too hold each trace once.
* ``sft.dataset/``: the same pairs as a Hugging Face dataset in TRL's conversational
  prompt-completion format (build-sft's ``<stem>.dataset``; ``SFTTrainer`` takes it as it
  is), rewritten with ``sft.jsonl``.
* ``config.json``: the settings a row depends on; a rerun with other settings into the
  same folder is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepzip import papercode
from stepzip.config import unescape
from stepzip.constants import MARKER
from stepzip.schemas import compress as compress_schemas
from stepzip.schemas import score as score_schemas
from trainer.build_sft import JsonlLog, pairs_from_result, write_dataset, write_json_atomic
from trainer.config import BuildSftConfig

SCORED, SFT, CONFIG = "scored.jsonl", "sft.jsonl", "config.json"
SFT_DATASET = "sft.dataset"
# Settings that change what a row means; a rerun into the same folder must keep them.
_ROW_SETTINGS = ("strategy", "ratio", "step_score", "delimiter", "marker", "answer",
                 "answer_max_tokens", "prompt_template", "system", "preset")


@dataclass
class ScoreConfig:
    input: str
    output: str
    urls: Sequence[str] = ("http://127.0.0.1:8000",)
    api_key: str | None = None
    batch_size: int = 8
    concurrency: int = 2
    strategy: str = "low"
    ratio: float = 0.8
    step_score: str = "sum"
    preset: str = "default"  # or "paper-code" (stepzip.papercode)
    delimiter: str | None = None
    marker: str = MARKER
    answer: bool = False
    answer_max_tokens: int = 64
    prompt_template: str | None = None
    system: str | None = None
    keep: str = "all"
    answer_from: str = "gold"
    timeout: float = 1800.0
    progress: bool = True

    def row_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ROW_SETTINGS}


def read_traces(path: Path) -> list[score_schemas.Pair]:
    """One Pair per non-blank line; ids unique (default: `<stem>-<line number>`)."""
    pairs, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            try:
                pair = score_schemas.Pair(
                    problem=record.get("problem", record.get("question")),
                    reasoning=record.get("reasoning"),
                    reasoning_ids=record.get("reasoning_ids"),
                    answer=None if record.get("answer") is None else str(record["answer"]),
                    id=str(record.get("id", f"{path.stem}-{line_no}")))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from exc
            if pair.id in seen:
                raise ValueError(f"{path}:{line_no}: id {pair.id!r} appears twice")
            seen.add(pair.id)
            pairs.append(pair)
    return pairs


def score_request(pairs: Sequence[score_schemas.Pair],
                  cfg: ScoreConfig) -> score_schemas.ScoreRequest:
    return score_schemas.ScoreRequest(
        pairs=list(pairs), answer=cfg.answer, answer_max_tokens=cfg.answer_max_tokens,
        variants=[compress_schemas.VariantSpec(strategy=cfg.strategy, ratio=cfg.ratio)],
        step_score=cfg.step_score, delimiter=unescape(cfg.delimiter), marker=cfg.marker,
        prompt_template=cfg.prompt_template, system=cfg.system, return_tokens=True,
        preset=cfg.preset)


def scored_rows(pairs: Sequence[score_schemas.Pair], response: dict) -> list[dict]:
    """One scored.jsonl row per pair of a /v1/score response (as JSON), in order."""
    return [{"id": pair.id, "problem": pair.problem, "gold": result["gold"],
             "prompt": result["prompt"], "delimiter": response["delimiter"],
             "trace": result["traces"][0]}
            for pair, result in zip(pairs, response["results"], strict=True)]


def sft_pairs(rows: Sequence[dict], cfg: ScoreConfig) -> list[dict]:
    """build-sft's pairs of every scored row that makes one (keep / answer_from)."""
    build = BuildSftConfig(keep=cfg.keep, answer_from=cfg.answer_from, marker=cfg.marker)
    out = []
    for row in rows:
        result = {"id": row["id"], "prompt": row["prompt"], "gold": row["gold"],
                  "traces": [row["trace"]]}
        pairs, _ = pairs_from_result(result, build, row["delimiter"], row["problem"],
                                     "score")
        out += pairs
    return out


def run_score(cfg: ScoreConfig, client: Any = None, log=print) -> dict:
    """Score every trace of cfg.input not yet in the output (resume); -> summary."""
    from clients.client import StepzipClient

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out / CONFIG, cfg)
    store = JsonlLog(out / SCORED)
    if store.repaired_bytes:
        log(f"cut a torn last line ({store.repaired_bytes} bytes) left by a killed run")
    done = {row["id"] for row in store.read()}
    pairs = read_traces(Path(cfg.input))
    todo = [p for p in pairs if p.id not in done]
    log(f"score: {len(pairs)} traces, {len(pairs) - len(todo)} already scored, "
        f"{len(todo)} to score -> {out}")
    own_client = client is None
    if own_client:
        client = StepzipClient(list(cfg.urls), api_key=cfg.api_key, timeout=cfg.timeout)
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    bar = _progress(len(todo), cfg.progress)
    started, tokens, failed = time.perf_counter(), 0, 0
    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
            pending: dict = {}
            while batches or pending:
                while batches and len(pending) < max(1, cfg.concurrency):
                    batch = batches.pop(0)
                    request = score_request(batch, cfg)
                    pending[pool.submit(client.score_request, request)] = batch
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    batch = pending.pop(future)
                    try:
                        response = future.result().model_dump(mode="json")
                    except Exception as exc:  # noqa: BLE001 - reported; a rerun asks again
                        failed += 1
                        log(f"batch of {len(batch)} failed: {type(exc).__name__}: {exc}")
                        continue
                    store.append(scored_rows(batch, response))
                    tokens += response["usage"]["completion_tokens"]
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
    finally:
        bar.close()
        if own_client:
            client.close()
    rows = store.read()
    sft = sft_pairs(rows, cfg)
    _write_jsonl_atomic(out / SFT, sft)
    if sft:
        write_dataset(sft, out / SFT_DATASET, BuildSftConfig(
            prompt_template=cfg.prompt_template, system=cfg.system,
            paper_code=cfg.preset == papercode.PRESET))
    seconds = time.perf_counter() - started
    summary = {"traces": len(pairs), "scored_before": len(pairs) - len(todo),
               "scored_now": len(rows) - (len(pairs) - len(todo)), "failed_batches": failed,
               "tokens_now": tokens, "tok_s": tokens / seconds if seconds else 0.0,
               "sft_pairs": len(sft)}
    log(f"score: {summary['scored_now']} traces scored this run ({tokens} tokens, "
        f"{summary['tok_s']:.0f} tok/s), {failed} failed batches; {len(rows)} in "
        f"{out / SCORED}, {len(sft)} SFT pairs in {out / SFT}")
    return summary


def _check_same_settings(path: Path, cfg: ScoreConfig) -> None:
    settings = cfg.row_settings()
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise SystemExit(f"{path.parent} was scored with other settings ({', '.join(changed)}); "
                             "use another --output or the same settings")
    else:
        write_json_atomic(path, settings)


def _write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    tmp.replace(path)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="trace", desc="score", file=sys.stderr,
                disable=not enabled or total == 0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score existing reasoning traces in bulk (/v1/score)",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL: problem, reasoning or "
                   "reasoning_ids, optional answer and id per line")
    p.add_argument("--output", required=True, help="folder (rerun = resume)")
    p.add_argument("--url", action="append", default=None,
                   help="a server; repeat (or comma-separate) for replicas "
                        "(default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server has one")
    p.add_argument("--batch-size", type=int, default=8, help="traces per request")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.add_argument("--strategy", default="low", choices=("low", "high", "random"),
                   help="which steps the SFT variant prunes (low = the paper)")
    p.add_argument("--ratio", type=float, default=0.8, help="kappa of the SFT variant")
    p.add_argument("--step-score", default=None, choices=("sum", "mean", "sampled"),
                   help="what steps are ranked by (None: sum; paper-code: sampled)")
    p.add_argument("--preset", default="default", choices=("default", "paper-code"),
                   help="paper-code: the authors' released scripts' step split, score, "
                        "collapse of repeats, int(N*kappa) pruning and bare join "
                        "(stepzip.papercode); --prompt-template: the one the traces were "
                        "generated with (default: paper-code's own)")
    p.add_argument("--delimiter", default=None, help="step delimiter (default: the server's)")
    p.add_argument("--marker", default=MARKER, help="text that replaces a pruned step")
    p.add_argument("--answer", action="store_true", help="answer from the compressed variant")
    p.add_argument("--answer-max-tokens", type=int, default=64,
                   help="tokens of the answer generated from the variant (with --answer)")
    p.add_argument("--prompt-template", default=None,
                   help="user-message template with {problem} (default: the server's)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--keep", default="all", choices=("all", "correct"),
                   help="SFT pairs: every trace, or those answered correctly (--answer)")
    p.add_argument("--answer-from", default="gold", choices=("gold", "model"),
                   help="SFT completion's answer: the gold one, or the model's (--answer)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one request may take")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    urls = [u for given in (args.url or ["http://127.0.0.1:8000"]) for u in given.split(",")]
    cfg = ScoreConfig(
        input=args.input, output=args.output, urls=urls, api_key=args.api_key,
        batch_size=args.batch_size, concurrency=args.concurrency, strategy=args.strategy,
        ratio=args.ratio, preset=args.preset,
        step_score=args.step_score or ("sampled" if args.preset == "paper-code" else "sum"),
        delimiter=args.delimiter,
        marker=args.marker, answer=args.answer, answer_max_tokens=args.answer_max_tokens,
        prompt_template=args.prompt_template, system=args.system, keep=args.keep,
        answer_from=args.answer_from, timeout=args.timeout, progress=args.progress)
    summary = run_score(cfg)
    return 1 if summary["failed_batches"] else 0

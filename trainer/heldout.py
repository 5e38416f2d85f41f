"""Held-out evaluation of a served policy: accuracy, tokens per completion and marker share
on problems no training stage saw, with bootstrap intervals.

One greedy completion per problem, rendered as the GRPO prompts are, from
``/v1/completions`` (``return_token_ids`` for the token count). Graded like this so that a
base model that never learned ``</think>`` is judged by the same rule as the trained one:
a completion that closes its reasoning is graded on the text after ``think_close`` (the
GRPO reward's rule); one that does not is graded on its whole text (a plain model's
"The answer is N" line). ``closed`` says which; ``accuracy_closed`` is the reward's own
rule (unclosed = wrong). Skips and the skip ratio are counted in the reasoning by the
reward's own functions. Grading goes through the bounded grader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clients.client import StepzipClient
from clients.eval import bootstrap_ci
from stepzip.grader import grade_many
from stepzip.rewards import RewardConfig, count_skips, skip_ratio, split_completion

REQUEST_PROMPTS = 32  # prompts per /v1/completions request
BOOTSTRAP = 2000      # resamples of the 95 % intervals
SEED = 0


def complete(url: str, prompts: Sequence[str], *, max_tokens: int, temperature: float = 0.0,
             concurrency: int = 2, seed: int = SEED) -> list[dict[str, Any]]:
    """One completion per prompt: {text, tokens}; requests of REQUEST_PROMPTS prompts."""
    chunks = [list(prompts[i:i + REQUEST_PROMPTS])
              for i in range(0, len(prompts), REQUEST_PROMPTS)]

    def one(chunk: list[str]) -> list[dict[str, Any]]:
        with StepzipClient(url) as client:
            body = {"prompt": chunk, "max_tokens": max_tokens, "temperature": temperature,
                    "seed": seed, "return_token_ids": True}
            choices = sorted(client.completions(body)["choices"], key=lambda c: c["index"])
        return [{"text": c["text"], "tokens": len(c.get("token_ids") or [])} for c in choices]

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return [row for rows in pool.map(one, chunks) for row in rows]


def score_rows(problems: Sequence[Any], outputs: Sequence[dict[str, Any]],
               cfg: RewardConfig) -> list[dict[str, Any]]:
    """Per problem: graded answer, closed reasoning, tokens, skips and skip ratio."""
    parts = [split_completion(o["text"], cfg.think_close) for o in outputs]
    graded = [answer if answer is not None else o["text"]
              for o, (_, answer) in zip(outputs, parts, strict=True)]
    grades = grade_many([(text, p.answer) for text, p in zip(graded, problems, strict=True)])
    rows = []
    for p, o, (reasoning, answer), g in zip(problems, outputs, parts, grades, strict=True):
        n_skips = count_skips(o["text"], marker=cfg.marker, think_close=cfg.think_close)
        rows.append({"id": p.id, "gold": p.answer, "text": o["text"], "tokens": o["tokens"],
                     "closed": answer is not None, "answer": g.extracted,
                     "grade": g.outcome, "correct": g.outcome == "correct",
                     "skips": n_skips, "with_marker": n_skips > 0,
                     "skip_ratio": skip_ratio(reasoning, n_skips, cfg.step_delimiter,
                                              cfg.marker)})
    return rows


def summarize(rows: Sequence[dict[str, Any]], resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals (problems resampled)."""
    def stat(values: list[float]) -> dict[str, Any]:
        mean = sum(values) / len(values) if values else float("nan")
        return {"mean": mean, "ci": bootstrap_ci(values, resamples, SEED)}

    return {
        "problems": len(rows),
        "accuracy": stat([float(r["correct"]) for r in rows]),
        "accuracy_closed": stat([float(r["correct"] and r["closed"]) for r in rows]),
        "tokens": stat([float(r["tokens"]) for r in rows]),
        "marker_share": stat([float(r["with_marker"]) for r in rows]),
        "skip_ratio": stat([float(r["skip_ratio"]) for r in rows]),
        "closed": stat([float(r["closed"]) for r in rows]),
        "ungradable": sum(1 for r in rows if r["grade"] == "ungradable"),
    }


def paired_delta(before: Sequence[dict], after: Sequence[dict], key: str = "correct",
                 resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """after - before on the same problems, with a paired bootstrap interval."""
    by_id = {r["id"]: float(r[key]) for r in before}
    diffs = [float(r[key]) - by_id[r["id"]] for r in after if r["id"] in by_id]
    mean = sum(diffs) / len(diffs) if diffs else float("nan")
    return {"mean": mean, "ci": bootstrap_ci(diffs, resamples, SEED), "problems": len(diffs)}


def evaluate(url: str, problems: Sequence[Any], prompts: Sequence[str], cfg: RewardConfig, *,
             max_tokens: int, out: Path | None = None,
             concurrency: int = 2) -> tuple[list[dict], dict[str, Any]]:
    """Rows and summary of one policy on the held-out problems (rows to `out` as JSONL)."""
    outputs = complete(url, prompts, max_tokens=max_tokens, concurrency=concurrency)
    rows = score_rows(problems, outputs, cfg)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, summarize(rows)


def summary_line(name: str, s: dict[str, Any]) -> str:
    def pct(k: str) -> str:
        m, (lo, hi) = s[k]["mean"], s[k]["ci"]
        return f"{100 * m:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"

    t, (tlo, thi) = s["tokens"]["mean"], s["tokens"]["ci"]
    return (f"held-out {name}: accuracy {pct('accuracy')} | tokens {t:.1f} [{tlo:.1f}, "
            f"{thi:.1f}] | marker share {pct('marker_share')} | skip ratio "
            f"{s['skip_ratio']['mean']:.3f} | closed {pct('closed')} "
            f"({s['problems']} problems, 95 % bootstrap CIs)")


COLORS = ("#999999", "#cccccc", "#4c72b0", "#55a868", "#c44e52")
PANELS = (("accuracy", "accuracy (%)", 100.0), ("tokens", "tokens per completion", 1.0),
          ("marker_share", "completions with a marker (%)", 100.0))


def plot(summaries: dict[str, dict[str, Any]], png_path: Path) -> Path:
    """One panel per measure: a bar per policy with its 95 % interval."""
    from trainer.metrics import _pyplot

    plt = _pyplot()
    names = list(summaries)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title, scale) in zip(axes, PANELS, strict=True):
        means = [summaries[n][key]["mean"] * scale for n in names]
        low = [m - summaries[n][key]["ci"][0] * scale for m, n in zip(means, names, strict=True)]
        high = [summaries[n][key]["ci"][1] * scale - m for m, n in zip(means, names, strict=True)]
        ax.bar(range(len(names)), means, yerr=[low, high], capsize=4,
               color=[COLORS[i % len(COLORS)] for i in range(len(names))])
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
    problems = next(iter(summaries.values()))["problems"] if summaries else 0
    fig.suptitle(f"held-out problems ({problems}), greedy; bars: 95 % bootstrap CIs",
                 fontsize=10)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path

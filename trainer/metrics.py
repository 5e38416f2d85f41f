"""Per-step metrics as JSONL and the plots drawn from them (SFT loss; GRPO: one panel per
reward component, total reward, skip ratio, tokens, accuracy)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
GRPO_PLOT = "grpo.png"
SFT_PLOT = "sft_loss.png"

# GRPO panels after the reward components: (metrics key, title).
GRPO_PANELS = (("reward", "total reward"), ("stepzip/skip_ratio", "skip ratio"),
               ("completions/mean_length", "tokens per completion"),
               ("stepzip/accuracy", "accuracy"), ("stepzip/closed_reasoning",
                                                  "closed reasoning (answer format)"))


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def append_record(path: Path, record: dict[str, Any]) -> None:
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps({k: jsonable(v) if not isinstance(v, dict) else v
                            for k, v in record.items()}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as one record per step: a step's lines merged in order, so a
    repeated step (a run resumed from an earlier checkpoint) keeps its latest values."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def reward_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({k for r in records for k in r
                   if k.startswith("rewards/") and k.endswith("/mean")})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, steps: list[int], values: list[Any], title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_grpo(metrics_path: Path, png_path: Path) -> Path:
    """One panel per reward component (mean over the step's completions), then total
    reward, skip ratio, tokens, accuracy and closed reasoning: no curve hides another."""
    plt = _pyplot()
    records = [r for r in read_metrics(metrics_path) if "reward" in r]
    steps = [r["step"] for r in records]
    panels = [(k, "reward: " + k.removeprefix("rewards/").removesuffix("/mean"))
              for k in reward_keys(records)] + list(GRPO_PANELS)
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        _panel(ax, steps, [r.get(key) for r in records], title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def plot_sft(metrics_path: Path, png_path: Path) -> Path:
    """The SFT training loss per logged step."""
    plt = _pyplot()
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    _panel(ax, [r["step"] for r in records], [r["loss"] for r in records], "SFT loss")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def safe_plot(plot, metrics_path: Path, png_path: Path, log=print) -> Path | None:
    """Draw a plot; a failed plot is reported, never fatal to a finished run."""
    if not Path(metrics_path).exists():
        return None
    try:
        return plot(metrics_path, png_path)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a run
        log(f"plot {png_path.name} failed: {type(exc).__name__}: {exc}")
        return None

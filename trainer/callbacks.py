"""GRPO callbacks: step clock, weight push to the server after every optimizer step, the
server's weight version (trl-vllm backend), and the per-step metrics line + plot."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.client import StepzipClient
from trainer.common import TrainerCallback
from trainer.metrics import GRPO_PLOT, METRICS_FILE, append_record, plot_grpo, safe_plot
from trainer.rollout import StepTimes

SYNC_DIR = "sync"


class StepClockCallback(TrainerCallback):
    """Wall time of each optimizer step (rollouts + scoring + update, not the sync)."""

    def __init__(self, times: StepTimes):
        self.times = times
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.times.step_s = time.perf_counter() - self._t0


class WeightSyncCallback(TrainerCallback):
    """After each optimizer step: write the policy (LoRA merged) to
    <output-dir>/sync/step-N and have the server load it before the next rollouts. Only
    the folder the server holds is kept; on a resumed run the restored weights are
    pushed first."""

    def __init__(self, client: StepzipClient, run_dir: Path, times: StepTimes, *,
                 dtype: Any = None, checksum: bool = True, log: Callable[[str], None] = print):
        self.client, self.run_dir, self.times = client, Path(run_dir), times
        self.dtype, self.checksum, self.log = dtype, checksum, log
        self.history: list[dict[str, Any]] = []

    @property
    def latest(self) -> Path | None:
        return Path(self.history[-1]["path"]) if self.history else None

    def push(self, model: Any, step: int) -> dict[str, Any]:
        from trainer.common import make_readable
        from trainer.modeling import export_policy

        folder = self.run_dir / SYNC_DIR / f"step-{step:06d}"
        before = self.client.weight_version()
        t0 = time.perf_counter()
        export_policy(model, folder, dtype=self.dtype)
        make_readable(folder)
        t1 = time.perf_counter()
        answer = self.client.load_weights(folder, checksum=self.checksum)
        t2 = time.perf_counter()
        record = {"step": step, "path": str(folder), "version_before": before,
                  "version_after": answer.get("version"), "checksum": answer.get("checksum"),
                  "save_s": t1 - t0, "load_s": t2 - t1, "server_s": answer.get("seconds"),
                  "sync_s": t2 - t0}
        self.history.append(record)
        self._prune(keep=folder)
        return record

    def _prune(self, keep: Path) -> None:
        """The server now holds `keep`; older pushes are copies nobody reads."""
        for old in (self.run_dir / SYNC_DIR).glob("step-*"):
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 and model is not None:
            self.log(f"grpo: resumed at step {state.global_step}; pushing its weights")
            record = self.push(model, state.global_step)
            self.log(f"grpo: server now on {record['version_after']} "
                     f"({record['sync_s']:.1f} s)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        record = self.push(model, state.global_step)
        t = self.times
        t.sync_s, t.sync_save_s, t.sync_load_s = record["sync_s"], record["save_s"], \
            record["load_s"]
        t.sync_server_s = record["server_s"]
        t.version_before, t.version_after = record["version_before"], record["version_after"]
        t.checksum = record["checksum"]


class VersionProbeCallback(TrainerCallback):
    """trl-vllm backend: TRL syncs before each generation; record the server's version."""

    def __init__(self, client: StepzipClient, times: StepTimes):
        self.client, self.times = client, times

    def on_step_begin(self, args, state, control, **kwargs):
        self.times.version_before = safe_call(self.client.weight_version)

    def on_step_end(self, args, state, control, **kwargs):
        self.times.version_after = safe_call(self.client.weight_version)


class MetricsCallback(TrainerCallback):
    """One JSON line per logged step (TRL's logs + the step's timings + weight version),
    one progress line on the console, the plot at the end."""

    def __init__(self, run_dir: Path, times: StepTimes, plot: bool = True,
                 log: Callable[[str], None] = print):
        self.path = Path(run_dir) / METRICS_FILE
        self.times, self.plot, self.log = times, plot, log
        self._logged_at: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:
            return
        record = {"step": state.global_step, "time": time.time(), **logs}
        snap = self.times.snapshot()
        if snap.get("step_s") is not None:
            snap["update_s"] = max(0.0, snap["step_s"] - snap["rollout_s"])
        record["timing"] = snap
        record["weight_version"] = snap.get("version_after")
        append_record(self.path, record)
        self.log(progress_line(record, state.max_steps))
        self.times.reset()
        self._logged_at = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        # TRL saves right after logging the step: the gap is the checkpoint's cost.
        if self._logged_at is not None:
            append_record(self.path, {"step": state.global_step,
                                      "checkpoint_s": time.perf_counter() - self._logged_at})
            self._logged_at = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot:
            safe_plot(plot_grpo, self.path, self.path.with_name(GRPO_PLOT), self.log)


def progress_line(record: dict[str, Any], max_steps: int) -> str:
    """grpo: step 3/12 reward 1.23 | skip ratio 0.45 | tokens 52.1 | accuracy 0.04 | ..."""
    def num(key: str) -> str:
        value = record.get(key)
        return "n/a" if not isinstance(value, (int, float)) else f"{value:.3f}"

    t = record.get("timing") or {}
    seconds = " ".join(f"{name} {t[key]:.0f}s" for key, name in
                       (("rollout_s", "rollouts"), ("update_s", "update"), ("sync_s", "sync"))
                       if isinstance(t.get(key), (int, float)))
    return (f"grpo: step {record['step']}/{max_steps} reward {num('reward')} | skip ratio "
            f"{num('stepzip/skip_ratio')} | tokens {num('completions/mean_length')} | "
            f"accuracy {num('stepzip/accuracy')} | closed {num('stepzip/closed_reasoning')}"
            f" | {seconds}")


def safe_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a probe for the logs only
        return None

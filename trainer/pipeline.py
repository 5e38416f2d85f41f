"""`stepzip train pipeline`: build-sft (server on the base model) -> sft -> grpo (server on
the SFT folder), starting each server itself on ``--port`` (or using ``--build-sft-url``
/ ``--grpo-url``), one engine at a time, saying what it waits for.

With ``--heldout N`` it evaluates the policy on N problems no stage saw (trainer.heldout:
accuracy, tokens per completion, marker share, bootstrap CIs) on the base model's server
after build-sft, on the GRPO server before the first GRPO step (the SFT model) and after
the last; with ``--ablation`` it then runs GRPO again from the SFT model on a fresh server
with correctness + skip ratio only (the paper's Table 4 ablation) and evaluates that too.
The table, paired differences and heldout.png land in the run folder.

A rerun in the same folder resumes: build-sft skips finished problems, a finished SFT
(its stepzip_train.json) is reused; GRPO starts over unless run as its own stage with
``--resume latest``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.client import StepzipClient
from trainer import heldout
from trainer.callbacks import SYNC_DIR
from trainer.config import (
    BuildSftConfig,
    GrpoRunConfig,
    PipelineConfig,
    SftRunConfig,
    with_preset,
)

# TRL sets VLLM_LOGGING_LEVEL=ERROR in the importing process; servers started from here
# would inherit it and log nothing useful.
SERVER_ENV = {"VLLM_LOGGING_LEVEL": "INFO"}
ABLATION_DIR = "grpo-ablation"


def serve_argv(model: str, *, dtype: str, max_model_len: int, weights_root: Path | None,
               delimiter: str | None = None, extra: list[str] | None = None) -> list[str]:
    """`stepzip serve` arguments (the port is ServerProcess's, given once)."""
    for arg in extra or []:
        if arg.split("=")[0] in ("--port", "--host"):
            raise ValueError(f"server-arg: {arg.split('=')[0]} is set by the pipeline's "
                             f"own --port; pass it there")
    argv = ["serve", "--model", model, "--dtype", dtype, "--max-model-len", str(max_model_len)]
    if delimiter is not None:
        argv += ["--step-delimiter", delimiter.encode("unicode_escape").decode()]
    if weights_root is not None:
        argv += ["--enable-weight-routes", "--weights-root", str(weights_root)]
    return argv + list(extra or [])


def start_server(server: Any, what: str, log: Callable[[str], None] = print,
                 every: float = 15.0) -> None:
    """server.start() with a line every `every` seconds: what it waits for and the last
    line of the server's log."""
    log(f"pipeline: starting the {what} server on {server.url} (log {server.log_path})")
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    while thread.is_alive():
        thread.join(every)
        if thread.is_alive():
            last = last_news(server.tail(20))
            log(f"pipeline: waiting for the {what} server /health ({time.perf_counter() - t0:.0f}"
                f" s): {last}")
    if failure:
        raise failure[0]
    log(f"pipeline: {what} server ready in {time.perf_counter() - t0:.1f} s")


def last_news(tail: str) -> str:
    """The server log's last line that is not our own /health poll."""
    lines = [line for line in (tail or "").splitlines()
             if line.strip() and "GET /health" not in line]
    return lines[-1].strip()[-120:] if lines else ""


def heldout_range(pcfg: PipelineConfig, build: BuildSftConfig,
                  grpo: GrpoRunConfig) -> tuple[int, int]:
    """(offset, count) of the held-out problems in GRPO's data set; refused where they
    would overlap the problems build-sft or GRPO use."""
    if grpo.limit is None and pcfg.heldout_offset is None:
        raise ValueError("heldout: GRPO uses every problem (no --limit); give "
                         "--heldout-offset past the problems it trains on")
    offset = (pcfg.heldout_offset if pcfg.heldout_offset is not None
              else grpo.offset + (grpo.limit or 0))
    end = offset + pcfg.heldout
    for name, cfg in (("build-sft", build), ("grpo", grpo)):
        if (cfg.dataset, cfg.split) != (grpo.dataset, grpo.split):
            continue
        stop = float("inf") if cfg.limit is None else cfg.offset + cfg.limit
        if offset < stop and cfg.offset < end:
            raise ValueError(f"heldout: problems {offset}..{end - 1} of {grpo.dataset}/"
                             f"{grpo.split} overlap those {name} uses ({cfg.offset}.."
                             f"{stop - 1}); set --heldout-offset")
    return offset, pcfg.heldout


def heldout_problems(grpo: GrpoRunConfig, offset: int, count: int,
                     tokenizer_dir: str) -> tuple[list[Any], list[str]]:
    """The held-out problems and their prompts, rendered as the GRPO prompts are."""
    from transformers import AutoTokenizer

    from stepzip.data import load_problems
    from trainer.grpo import grpo_dataset_rows

    problems = load_problems(grpo.dataset, grpo.split, limit=count, offset=offset,
                             **grpo.fields())
    if len(problems) < count:
        raise ValueError(f"heldout: {grpo.dataset}/{grpo.split} has {len(problems)} problems "
                         f"from {offset}, not {count}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = grpo_dataset_rows(problems, tokenizer, grpo.prompt_template, grpo.system)
    return problems, [row["prompt"] for row in rows]


def ablation_config(grpo: GrpoRunConfig, run_dir: Path) -> GrpoRunConfig:
    """The same GRPO run with correctness + skip ratio only (no skip-count or length
    guard), into its own folder; its numbers are the point, so no final model is saved
    (its last checkpoint holds the adapter)."""
    return dataclasses.replace(
        grpo, output_dir=str(run_dir / ABLATION_DIR), save_final=False,
        reward=dataclasses.replace(grpo.reward, skip_count=False, length=False))


def comparison(rows: dict[str, list[dict]], summaries: dict[str, dict]) -> dict[str, Any]:
    """Paired differences (same problems) of accuracy and tokens against the SFT model
    and the base model."""
    order = list(summaries)  # evaluation order: a policy is compared with earlier ones
    out: dict[str, Any] = {}
    for after in order:
        for before in ("before_sft", "after_sft"):
            if before not in order or order.index(after) <= order.index(before):
                continue
            out[f"{after} - {before}"] = {
                key: heldout.paired_delta(rows[before], rows[after], key)
                for key in ("correct", "tokens", "with_marker")}
    return out


def guard_rates(metrics_path: Path, cfg: Any) -> dict[str, float | None]:
    """Share of GRPO completions each guard penalised, over the whole run (from the mean
    of its reward component per step; None when the component was off)."""
    from trainer.metrics import read_metrics

    records = read_metrics(metrics_path)
    out: dict[str, float | None] = {}
    for name, penalty in (("length", cfg.too_long_penalty),
                          ("skip_count", cfg.too_many_skips_penalty)):
        values = [r[f"rewards/{name}/mean"] for r in records if f"rewards/{name}/mean" in r]
        on = getattr(cfg, name) and values and penalty
        out[name] = abs(sum(values) / len(values) / penalty) if on else None
    return out


def table(summaries: dict[str, dict]) -> str:
    """Markdown table of the held-out summaries (as the README shows it)."""
    def cell(s: dict, key: str, scale: float, digits: int) -> str:
        m, (lo, hi) = s[key]["mean"] * scale, [v * scale for v in s[key]["ci"]]
        return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    lines = [("| policy | budget | accuracy % | tokens / completion | marker share % | "
              "skip ratio | closed % |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s.get('max_tokens', '')} | {cell(s, 'accuracy', 100, 1)} | "
                     f"{cell(s, 'tokens', 1, 1)} | "
                     f"{cell(s, 'marker_share', 100, 1)} | {s['skip_ratio']['mean']:.3f} | "
                     f"{100 * s['closed']['mean']:.1f} |")
    return "\n".join(lines)


def run_pipeline(run_dir: Path, *, model: str = "default", preset: str | None = None,
                 dataset: str | None = None, limit: int | None = None,
                 question_field: str | None = None, answer_field: str | None = None,
                 server_dtype: str = "float32", max_model_len: int = 1024,
                 port: int | None = None, build_sft_url: str | None = None,
                 grpo_url: str | None = None, server_args: list[str] | None = None,
                 report_to: str = "none", pipeline: PipelineConfig | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """build-sft -> sft -> grpo (-> the ablation's grpo); returns seconds per phase, the
    held-out evaluation and the summaries (also in <run>/pipeline.json)."""
    from clients.launcher import ServerProcess
    from trainer.build_sft import build_sft
    from trainer.grpo import run_grpo
    from trainer.modeling import read_meta, resolve_model
    from trainer.sft import run_sft

    pcfg = pipeline if pipeline is not None else with_preset(PipelineConfig, preset)
    if pcfg.ablation and grpo_url is not None:
        raise ValueError("ablation: needs a fresh server on the SFT model, which --grpo-url "
                         "cannot give; leave out --grpo-url or pass --no-ablation")
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    data = {k: v for k, v in (("dataset", dataset), ("limit", limit),
                              ("question_field", question_field),
                              ("answer_field", answer_field)) if v is not None}
    base = resolve_model(model)
    grpo_dir = run_dir / "grpo"
    build_cfg = with_preset(BuildSftConfig, preset, url="", output=str(run_dir / "sft.jsonl"),
                            **data)
    grpo_cfg = with_preset(GrpoRunConfig, preset, model=str(run_dir / "sft"),
                           output_dir=str(grpo_dir), report_to=report_to, **data)
    rows: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    problems: list[Any] = []
    prompts: list[str] = []
    if pcfg.heldout:
        offset, count = heldout_range(pcfg, build_cfg, grpo_cfg)
        problems, prompts = heldout_problems(grpo_cfg, offset, count, base)
        log(f"pipeline: {count} held-out problems: {grpo_cfg.dataset}/{grpo_cfg.split} "
            f"{offset}..{offset + count - 1}")
    max_tokens = pcfg.heldout_max_tokens or grpo_cfg.max_completion_length

    def evaluate(name: str, url: str, meta: dict[str, Any], tokens: int = max_tokens) -> None:
        if not pcfg.heldout:
            return
        t1 = time.perf_counter()
        rows[name], summaries[name] = heldout.evaluate(
            url, problems, prompts, grpo_cfg.reward_config(meta), max_tokens=tokens,
            out=run_dir / "heldout" / f"{name}.jsonl")
        summaries[name]["max_tokens"] = tokens
        seconds[f"heldout_{name}"] = time.perf_counter() - t1
        log("pipeline: " + heldout.summary_line(name, summaries[name]))

    def serving(argv: list[str], url: str | None, what: str, log_name: str):
        if url is not None:
            return _Existing(url, what, log)
        return _Started(ServerProcess(argv, port=port, env=SERVER_ENV,
                                      log_path=run_dir / log_name), what, log)

    # `serve --model default` also picks the default model's single-newline delimiter.
    served = "default" if model in ("default", "", None) else base
    t = time.perf_counter()
    with serving(serve_argv(served, dtype=server_dtype, max_model_len=max_model_len,
                            weights_root=None, extra=server_args),
                 build_sft_url, "build-sft (base model)", "server-build-sft.log") as url:
        seconds["server_start_build_sft"] = time.perf_counter() - t
        t1 = time.perf_counter()
        stats = build_sft(dataclasses.replace(build_cfg, url=url), log=log)
        seconds["build_sft"] = time.perf_counter() - t1
        reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped_by_reason.items())
        log(f"pipeline: SFT pairs: {stats.kept_total} kept, {stats.dropped} problems dropped "
            f"this run ({reasons or 'none'}; keep={build_cfg.keep})")
        evaluate("before_sft", url, {"delimiter": stats.delimiter})
        if pcfg.heldout_base_max_tokens:
            evaluate(f"before_sft_{pcfg.heldout_base_max_tokens}_tokens", url,
                     {"delimiter": stats.delimiter}, pcfg.heldout_base_max_tokens)

    t = time.perf_counter()
    sft = read_meta(run_dir / "sft")  # written last by a finished SFT: a rerun reuses it
    if sft.get("stage") == "sft":
        log(f"pipeline: SFT already done in {run_dir / 'sft'}; reusing it")
    else:
        sft = run_sft(with_preset(SftRunConfig, preset, model=base,
                                  data=str(run_dir / "sft.jsonl"),
                                  output_dir=str(run_dir / "sft"), report_to=report_to),
                      log=log)
    seconds["sft"] = time.perf_counter() - t

    runs = {"grpo": (grpo_cfg, "GRPO (SFT model, weight routes)", "server-grpo.log")}
    if pcfg.ablation:
        runs["grpo_ablation"] = (ablation_config(grpo_cfg, run_dir),
                                 "ablation GRPO (SFT model, correctness + skip ratio only)",
                                 "server-grpo-ablation.log")
    results: dict[str, Any] = {}
    for name, (cfg, what, log_name) in runs.items():
        Path(cfg.output_dir).mkdir(exist_ok=True)
        t = time.perf_counter()
        with serving(serve_argv(str(run_dir / "sft"), dtype=server_dtype,
                                max_model_len=max_model_len, weights_root=Path(cfg.output_dir),
                                delimiter=sft.get("delimiter"), extra=server_args),
                     grpo_url, what, log_name) as url:
            seconds[f"server_start_{name}"] = time.perf_counter() - t
            if name == "grpo":
                evaluate("after_sft", url, sft)
            log(f"pipeline: {name}: reward components {', '.join(cfg.reward.enabled())}")
            t1 = time.perf_counter()
            results[name] = run_grpo(dataclasses.replace(cfg, url=url), log=log)
            seconds[name] = time.perf_counter() - t1
            seconds.update({f"{name}_{k}": v for k, v in results[name]["time_split"].items()})
            results[name]["guards_fired"] = guard_rates(Path(cfg.output_dir) / "metrics.jsonl",
                                                        cfg.reward)
            log(f"pipeline: {name}: share of completions penalised by the length guard "
                f"{_share(results[name]['guards_fired']['length'])}, by the skip-count guard "
                f"{_share(results[name]['guards_fired']['skip_count'])}")
            evaluate(f"after_{name}", url, sft)
        seconds[f"{name}_total"] = time.perf_counter() - t
        if not cfg.save_final:  # the server held the last push; nothing else needs it
            shutil.rmtree(Path(cfg.output_dir) / SYNC_DIR, ignore_errors=True)

    result = {"seconds": seconds, "sft": sft, "grpo": results.get("grpo"),
              "grpo_ablation": results.get("grpo_ablation"),
              "pipeline": dataclasses.asdict(pcfg), "disk_bytes": disk_usage(run_dir)}
    if summaries:
        result["heldout"] = {"problems": len(problems), "dataset": grpo_cfg.dataset,
                             "split": grpo_cfg.split, "max_tokens": max_tokens,
                             "greedy": True, "summaries": summaries,
                             "paired": comparison(rows, summaries)}
        (run_dir / "heldout.json").write_text(json.dumps(result["heldout"], indent=2))
        (run_dir / "heldout.md").write_text(table(summaries) + "\n")
        heldout.plot(summaries, run_dir / "heldout.png")
        log("pipeline: held-out results (also heldout.md, heldout.json, heldout.png):\n"
            + table(summaries))
    (run_dir / "pipeline.json").write_text(json.dumps(result, indent=2, default=str))
    seconds["total"] = time.perf_counter() - started
    log(f"pipeline: done in {seconds['total']:.0f} s"
        f"; {result['disk_bytes'] / 1e9:.2f} GB on disk in {run_dir}; plots "
        f"{run_dir / 'sft' / 'sft_loss.png'}, {grpo_dir / 'grpo.png'}")
    return result


def _share(value: float | None) -> str:
    return "off" if value is None else f"{100 * value:.1f} %"


def disk_usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


class _Started:
    """A server this pipeline starts and stops; yields its URL."""

    def __init__(self, server: Any, what: str, log: Callable[[str], None]):
        self.server, self.what, self.log = server, what, log

    def __enter__(self) -> str:
        try:
            start_server(self.server, self.what, self.log)
        except BaseException:
            self.server.stop()
            raise
        return self.server.url

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.log(f"pipeline: stopped the {self.what} server")


class _Existing:
    """A server someone else runs; the pipeline waits until it is ready."""

    def __init__(self, url: str, what: str, log: Callable[[str], None]):
        self.url, self.what, self.log = url, what, log

    def __enter__(self) -> str:
        self.log(f"pipeline: waiting for the {self.what} server at {self.url}")
        with StepzipClient(self.url) as client:
            client.wait_ready(timeout=3600)
        return self.url

    def __exit__(self, *exc) -> None:
        return None

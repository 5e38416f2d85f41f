"""`stepzip train pipeline`: build-sft (server on the base model) -> sft -> grpo (server on
the SFT folder), starting each server itself on ``--port`` (or using ``--build-sft-url``
/ ``--grpo-url``), one engine at a time, saying what it waits for.

Before SFT (on the base model's server) and after it (on the GRPO server, before any
GRPO step) it samples the GRPO settings' completions for held-out problems and reports
the share that write the marker in their reasoning: what SFT taught; and again after GRPO.

A rerun in the same folder resumes: build-sft skips finished problems, a finished SFT
(its stepzip_train.json) is reused; GRPO starts over unless run as its own stage with
``--resume latest``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.client import StepzipClient
from trainer.config import BuildSftConfig, GrpoRunConfig, SftRunConfig, with_preset

# TRL sets VLLM_LOGGING_LEVEL=ERROR in the importing process; servers started from here
# would inherit it and log nothing useful.
SERVER_ENV = {"VLLM_LOGGING_LEVEL": "INFO"}
PROBE_PROMPTS = 16  # held-out problems of the marker-share probe
PROBE_SAMPLES = 4   # completions each


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


def marker_share(url: str, prompts: list[str], *, marker: str, delimiter: str | None,
                 samples: int, max_tokens: int, temperature: float, seed: int = 0,
                 tokenizer: Any = None) -> dict[str, Any]:
    """Share of sampled completions whose reasoning holds the marker, and their mean skip
    ratio, by the server's own count (`stepzip` fields of /v1/completions)."""
    client = StepzipClient(url)
    try:
        body: dict[str, Any] = {"prompt": prompts, "n": samples, "max_tokens": max_tokens,
                                "temperature": temperature, "seed": seed,
                                "stepzip": {"marker": marker}}
        if delimiter:
            body["stepzip"]["delimiter"] = delimiter
        choices = client.completions(body)["choices"]
    finally:
        client.close()
    stats = [c.get("stepzip") or {} for c in choices]
    with_marker = sum(1 for s in stats if s.get("n_skips", 0) > 0)
    ratios = [float(s.get("skip_ratio", 0.0)) for s in stats]
    return {"completions": len(choices), "with_marker": with_marker,
            "share": with_marker / max(1, len(choices)),
            "mean_skip_ratio": sum(ratios) / max(1, len(ratios)),
            "example": choices[0].get("text") if choices else None}


def share_line(name: str, probe: dict[str, Any]) -> str:
    return (f"pipeline: marker share {name}: {probe['with_marker']}/{probe['completions']} "
            f"completions ({100 * probe['share']:.1f} %), mean skip ratio "
            f"{probe['mean_skip_ratio']:.3f}")


def probe_prompts(cfg: GrpoRunConfig, tokenizer_dir: str) -> list[str]:
    """Held-out problems (after the GRPO ones), rendered as the GRPO prompts are."""
    from transformers import AutoTokenizer

    from stepzip.data import load_problems
    from trainer.grpo import grpo_dataset_rows

    offset = cfg.offset + (cfg.limit or 0)
    problems = load_problems(cfg.dataset, cfg.split, limit=PROBE_PROMPTS, offset=offset,
                             **cfg.fields())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [row["prompt"] for row in grpo_dataset_rows(problems, tokenizer, cfg.prompt_template,
                                                       cfg.system)]


def run_pipeline(run_dir: Path, *, model: str = "default", preset: str | None = None,
                 dataset: str | None = None, limit: int | None = None,
                 question_field: str | None = None, answer_field: str | None = None,
                 server_dtype: str = "float32", max_model_len: int = 1024,
                 port: int | None = None, build_sft_url: str | None = None,
                 grpo_url: str | None = None, server_args: list[str] | None = None,
                 report_to: str = "none", log: Callable[[str], None] = print) -> dict:
    """build-sft -> sft -> grpo; returns seconds per phase, the probes and the summaries
    (also in <run>/pipeline.json)."""
    from clients.launcher import ServerProcess
    from trainer.build_sft import build_sft
    from trainer.grpo import run_grpo
    from trainer.modeling import read_meta, resolve_model
    from trainer.sft import run_sft

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    data = {k: v for k, v in (("dataset", dataset), ("limit", limit),
                              ("question_field", question_field),
                              ("answer_field", answer_field)) if v is not None}
    base = resolve_model(model)
    grpo_dir = run_dir / "grpo"
    grpo_cfg = with_preset(GrpoRunConfig, preset, model=str(run_dir / "sft"),
                           output_dir=str(grpo_dir), report_to=report_to, **data)
    probe_args = {"samples": PROBE_SAMPLES, "max_tokens": grpo_cfg.max_completion_length,
                  "temperature": grpo_cfg.temperature}
    prompts = probe_prompts(grpo_cfg, base)
    probes: dict[str, Any] = {}

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
        stats = build_sft(with_preset(BuildSftConfig, preset, url=url,
                                      output=str(run_dir / "sft.jsonl"), **data), log=log)
        seconds["build_sft"] = time.perf_counter() - t1
        probes["before_sft"] = marker_share(url, prompts, marker=grpo_cfg.reward.marker,
                                            delimiter=stats.delimiter, **probe_args)
        log(share_line("before SFT (base model)", probes["before_sft"]))

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

    grpo_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    with serving(serve_argv(str(run_dir / "sft"), dtype=server_dtype,
                            max_model_len=max_model_len, weights_root=grpo_dir,
                            delimiter=sft.get("delimiter"), extra=server_args),
                 grpo_url, "GRPO (SFT model, weight routes)", "server-grpo.log") as url:
        seconds["server_start_grpo"] = time.perf_counter() - t
        probes["after_sft"] = marker_share(url, prompts, marker=sft["marker"],
                                           delimiter=sft.get("delimiter"), **probe_args)
        log(share_line("after SFT", probes["after_sft"]))
        t1 = time.perf_counter()
        grpo = run_grpo(_replace(grpo_cfg, url=url), log=log)
        seconds["grpo"] = time.perf_counter() - t1
        seconds.update({f"grpo_{k}": v for k, v in grpo["time_split"].items()})
        probes["after_grpo"] = marker_share(url, prompts, marker=sft["marker"],
                                            delimiter=sft.get("delimiter"), **probe_args)
        log(share_line("after GRPO", probes["after_grpo"]))
    seconds["grpo_total"] = time.perf_counter() - t
    result = {"seconds": seconds, "probes": probes, "sft": sft, "grpo": grpo,
              "disk_bytes": disk_usage(run_dir)}
    (run_dir / "pipeline.json").write_text(json.dumps(result, indent=2, default=str))
    log(f"pipeline: done in {sum(v for k, v in seconds.items() if k in _PHASES):.0f} s; "
        f"{result['disk_bytes'] / 1e9:.2f} GB on disk in {run_dir}; plots "
        f"{run_dir / 'sft' / 'sft_loss.png'}, {grpo_dir / 'grpo.png'}")
    return result


_PHASES = ("server_start_build_sft", "build_sft", "sft", "grpo_total")


def _replace(cfg: GrpoRunConfig, **values: Any) -> GrpoRunConfig:
    from dataclasses import replace

    return replace(cfg, **values)


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

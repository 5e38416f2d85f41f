"""`stepzip train ...`: the training stages.

    stepzip train build-sft --url U --output pairs.jsonl      compressed SFT pairs (resumable)
    stepzip train sft --data pairs.jsonl --output-dir M       SFT with [SKIP] added
    stepzip serve --model M --enable-weight-routes --weights-root R    (the rollout server)
    stepzip train grpo --model M --url U --output-dir R       GRPO, weights pushed each step
    stepzip train pipeline --tiny --output-dir RUN            all three, servers started here

`--tiny` on any stage selects the CPU preset (explicit flags still win).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainer.config import BuildSftConfig, GrpoRunConfig, SftRunConfig, add_flags, from_args


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="training stages (build-sft, sft, grpo, pipeline)",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = train.add_subparsers(metavar="stage")

    build = stages.add_parser("build-sft", help="compressed (problem, CoT) pairs via "
                              "/v1/compress", description=BuildSftConfig.__doc__)
    add_flags(build, BuildSftConfig)
    build.set_defaults(func=cmd_build_sft)

    sft = stages.add_parser("sft", help="SFT on the pairs ([SKIP] token added)",
                            description=SftRunConfig.__doc__)
    add_flags(sft, SftRunConfig)
    sft.set_defaults(func=cmd_sft)

    grpo = stages.add_parser("grpo", help="GRPO with the four-part reward, rollouts from "
                             "the server", description=GrpoRunConfig.__doc__)
    add_flags(grpo, GrpoRunConfig)
    grpo.set_defaults(func=cmd_grpo)

    pipe = stages.add_parser("pipeline", help="build-sft -> sft -> grpo, starting the "
                             "servers itself (one at a time)")
    pipe.add_argument("--output-dir", type=Path, required=True, help="run folder")
    pipe.add_argument("--model", default="default", help="base model (default: embedded)")
    pipe.add_argument("--tiny", action="store_true", help="the tiny CPU preset")
    pipe.add_argument("--dataset", default="gsm8k")
    pipe.add_argument("--limit", type=int, default=None, help="problems per stage")
    pipe.add_argument("--server-dtype", default="float32",
                      help="--dtype of the servers (float32 keeps synced fp32 weights exact)")
    pipe.add_argument("--max-model-len", type=int, default=1024)
    pipe.add_argument("--server-arg", action="append", default=[],
                      help="extra `stepzip serve` argument (repeat; e.g. --server-arg=--kv-cache-gib=1)")
    pipe.set_defaults(func=cmd_pipeline)


def cmd_build_sft(args) -> int:
    from trainer.build_sft import build_sft

    stats = build_sft(from_args(BuildSftConfig, args))
    return 1 if stats.failed_batches else 0


def cmd_sft(args) -> int:
    from trainer.sft import run_sft

    run_sft(from_args(SftRunConfig, args))
    return 0


def cmd_grpo(args) -> int:
    from trainer.grpo import run_grpo

    run_grpo(from_args(GrpoRunConfig, args))
    return 0


def cmd_pipeline(args) -> int:
    result = run_pipeline(args.output_dir, model=args.model, tiny=args.tiny,
                          dataset=args.dataset, limit=args.limit,
                          server_dtype=args.server_dtype, max_model_len=args.max_model_len,
                          server_args=args.server_arg)
    print(json.dumps(result["seconds"], indent=2))
    return 0


# TRL sets VLLM_LOGGING_LEVEL=ERROR in the importing process; servers started from here
# would inherit it and log nothing useful.
SERVER_ENV = {"VLLM_LOGGING_LEVEL": "INFO"}


def serve_argv(model: str, *, dtype: str, max_model_len: int, weights_root: Path | None,
               delimiter: str | None = None, extra: list[str] | None = None) -> list[str]:
    argv = ["serve", "--model", model, "--dtype", dtype, "--max-model-len", str(max_model_len)]
    if delimiter is not None:
        argv += ["--step-delimiter", delimiter.encode("unicode_escape").decode()]
    if weights_root is not None:
        argv += ["--enable-weight-routes", "--weights-root", str(weights_root)]
    return argv + list(extra or [])


def run_pipeline(run_dir: Path, *, model: str = "default", tiny: bool = False,
                 dataset: str = "gsm8k", limit: int | None = None,
                 server_dtype: str = "float32", max_model_len: int = 1024,
                 server_args: list[str] | None = None) -> dict:
    """build-sft (server on the base model) -> sft -> grpo (server on the SFT folder)."""
    from clients.launcher import ServerProcess
    from trainer.build_sft import build_sft
    from trainer.config import TINY
    from trainer.grpo import run_grpo
    from trainer.modeling import resolve_model
    from trainer.sft import run_sft

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    extra = {"dataset": dataset, **({"limit": limit} if limit is not None else {})}
    base = resolve_model(model)

    def cfg(cls, **over):
        values = {**(TINY[cls] if tiny else {}), **over}
        return cls(**values)

    t = time.perf_counter()
    # `serve --model default` also picks the default model's single-newline delimiter.
    served = "default" if model in ("default", "", None) else base
    with ServerProcess(serve_argv(served, dtype=server_dtype, max_model_len=max_model_len,
                                  weights_root=None, extra=server_args),
                       env=SERVER_ENV, log_path=run_dir / "server-build-sft.log") as server:
        seconds["server_start_build_sft"] = server.startup_s or 0.0
        t1 = time.perf_counter()
        build_sft(cfg(BuildSftConfig, url=server.url, output=str(run_dir / "sft.jsonl"),
                      **extra))
        seconds["build_sft"] = time.perf_counter() - t1
    seconds["build_sft_total"] = time.perf_counter() - t

    t = time.perf_counter()
    sft = run_sft(cfg(SftRunConfig, model=base, data=str(run_dir / "sft.jsonl"),
                      output_dir=str(run_dir / "sft")))
    seconds["sft"] = time.perf_counter() - t

    grpo_dir = run_dir / "grpo"
    grpo_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    with ServerProcess(serve_argv(str(run_dir / "sft"), dtype=server_dtype,
                                  max_model_len=max_model_len, weights_root=grpo_dir,
                                  delimiter=sft.get("delimiter"), extra=server_args),
                       env=SERVER_ENV, log_path=run_dir / "server-grpo.log") as server:
        seconds["server_start_grpo"] = server.startup_s or 0.0
        t1 = time.perf_counter()
        grpo = run_grpo(cfg(GrpoRunConfig, model=str(run_dir / "sft"), url=server.url,
                            output_dir=str(grpo_dir), **extra))
        seconds["grpo"] = time.perf_counter() - t1
        seconds.update({f"grpo_{k}": v for k, v in grpo["time_split"].items()})
    seconds["grpo_total"] = time.perf_counter() - t
    (run_dir / "pipeline_seconds.json").write_text(json.dumps(seconds, indent=2))
    return {"seconds": seconds, "sft": sft, "grpo": grpo}


if __name__ == "__main__":  # pragma: no cover
    from clients.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

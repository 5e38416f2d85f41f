"""`stepzip train ...`: the training stages.

    stepzip train build-sft --url U --output pairs.jsonl      compressed SFT pairs (resumable)
    stepzip train sft --data pairs.jsonl --output-dir M       SFT with [SKIP] added
    stepzip serve --model M --enable-weight-routes --weights-root R    (the rollout server)
    stepzip train grpo --model M --url U --output-dir R       GRPO, weights pushed each step
    stepzip train pipeline --preset cpu-demo --output-dir RUN all three, servers started here

`--preset tiny|cpu-demo|paper-code` on any stage selects a preset (explicit flags still
win; paper-code: the authors' released scripts' settings, stepzip/papercode.py);
`--tiny` is short for `--preset tiny`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepzip import config
from stepzip.data import ANSWER_FIELD_HELP, DATASET_HELP, QUESTION_FIELD_HELP
from trainer.config import (
    REPORT_TO,
    BuildSftConfig,
    GrpoRunConfig,
    PipelineConfig,
    SftRunConfig,
    add_flags,
    add_preset_flags,
    from_args,
    preset_name,
)


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
    add_preset_flags(pipe)
    pipe.add_argument("--dataset", default=None,
                      help=f"{DATASET_HELP} (default: the preset's, else gsm8k)")
    pipe.add_argument("--question-field", default=None, help=QUESTION_FIELD_HELP)
    pipe.add_argument("--answer-field", default=None, help=ANSWER_FIELD_HELP)
    pipe.add_argument("--limit", type=int, default=None, help="problems per stage")
    pipe.add_argument("--port", type=int, default=None,
                      help="port of the servers the pipeline starts, one after the other "
                           "(default: a free one)")
    pipe.add_argument("--build-sft-url", default=None,
                      help="use this server on the base model for build-sft instead of "
                           "starting one")
    pipe.add_argument("--grpo-url", default=None,
                      help="use this server for GRPO instead of starting one (it must serve "
                           "<output-dir>/sft with --enable-weight-routes --weights-root "
                           "<output-dir>/grpo; the pipeline waits for it)")
    pipe.add_argument("--server-dtype", default="float32",
                      help="--dtype of the servers (float32 keeps synced fp32 weights exact)")
    pipe.add_argument("--max-model-len", type=int, default=1024,
                      help="--max-model-len of the servers")
    pipe.add_argument("--report-to", default="none",
                      choices=REPORT_TO,
                      help="tracker for the SFT and GRPO stages' logs (see `train grpo "
                           "--report-to`)")
    pipe.add_argument("--server-arg", action="append", default=[],
                      help="extra `stepzip serve` argument (repeat; e.g. "
                           "--server-arg=--kv-cache-gib=1; the port is --port)")
    config.add_flags(pipe, PipelineConfig)
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
    from trainer.pipeline import run_pipeline

    result = run_pipeline(args.output_dir, model=args.model, preset=preset_name(args),
                          dataset=args.dataset, limit=args.limit,
                          question_field=args.question_field, answer_field=args.answer_field,
                          server_dtype=args.server_dtype, max_model_len=args.max_model_len,
                          port=args.port, build_sft_url=args.build_sft_url,
                          grpo_url=args.grpo_url, server_args=args.server_arg,
                          report_to=args.report_to,
                          pipeline=from_args(PipelineConfig, args))
    print(json.dumps({"seconds": result["seconds"],
                      "first_and_last_grpo_step": {
                          name: result[name]["first_and_last"]
                          for name in ("grpo", "grpo_ablation") if result.get(name)},
                      "disk_bytes": result["disk_bytes"]}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from clients.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

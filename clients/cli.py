"""`stepzip` command line: model preparation, serving, the demo, benchmarks.

    stepzip model prepare            convert the embedded default model once (idempotent)
    stepzip serve [--model M ...]    run the HTTP server
    stepzip demo                     serve the default model and compress sample problems
    stepzip compress --url U ...     compress problems with a running server
    stepzip bench entropy ...        throughput with the entropy processor on vs off
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepzip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(metavar="command")

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(metavar="action")
    prepare = model_sub.add_parser("prepare", help="convert the embedded GGUF once")
    prepare.add_argument("--cache-dir", type=Path, default=None,
                         help="cache folder (default: $STEPZIP_MODEL_CACHE or ~/.cache/stepzip)")
    prepare.add_argument("--force", action="store_true", help="convert again")
    prepare.set_defaults(func=cmd_model_prepare)

    serve = sub.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="serve the default model and compress sample problems")
    demo.add_argument("--model", default="default")
    demo.add_argument("--problems", type=int, default=3, help="GSM8K test problems to send")
    demo.add_argument("--max-tokens", type=int, default=192)
    demo.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    demo.add_argument("--url", default=None, help="use a running server instead of starting one")
    demo.add_argument("--json", type=Path, default=None, help="also write the response here")
    demo.set_defaults(func=cmd_demo)

    comp = sub.add_parser("compress", help="compress problems with a running server")
    comp.add_argument("problems", nargs="*", help="problem texts (or use --dataset)")
    comp.add_argument("--url", default="http://127.0.0.1:8000")
    comp.add_argument("--api-key", default=None)
    comp.add_argument("--dataset", default=None, help="gsm8k, math500, svamp or a .jsonl path")
    comp.add_argument("--split", default="test")
    comp.add_argument("--limit", type=int, default=3)
    comp.add_argument("--max-tokens", type=int, default=256)
    comp.add_argument("--ratio", type=float, action="append", default=None,
                      help="low-entropy ratio(s) to build (default 0.8)")
    comp.add_argument("--json", action="store_true", help="print the raw JSON response")
    comp.set_defaults(func=cmd_compress)

    from clients import bench
    from trainer import cli as train_cli

    bench.add_parser(sub)
    train_cli.add_parser(sub)
    return parser


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from server.settings import ServerSettings
    from stepzip.config import add_flags

    add_flags(parser, ServerSettings)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra vLLM AsyncEngineArgs, e.g. --engine-arg block_size=32")


def settings_from_args(args: argparse.Namespace):
    from server.settings import ServerSettings
    from stepzip.config import from_args

    extra = {}
    for item in getattr(args, "engine_arg", []):
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return from_args(ServerSettings, args, extra_engine_args=extra)


def cmd_model_prepare(args) -> int:
    from stepzip.modelcache import prepare_default_model

    prepare_default_model(args.cache_dir, force=args.force)
    return 0


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_args(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", timeout_graceful_shutdown=10)
    return 0


def cmd_demo(args) -> int:
    from clients.demo import run_demo

    return run_demo(model=args.model, n_problems=args.problems, max_tokens=args.max_tokens,
                    port=args.port, url=args.url, json_path=args.json)


def cmd_compress(args) -> int:
    from clients.client import StepzipClient
    from clients.report import print_compress_table
    from stepzip.data import load_problems

    texts, golds = list(args.problems), [None] * len(args.problems)
    if args.dataset:
        problems = load_problems(args.dataset, args.split, limit=args.limit)
        texts += [p.question for p in problems]
        golds += [p.answer for p in problems]
    if not texts:
        print("give problem texts or --dataset", file=sys.stderr)
        return 2
    variants = [{"strategy": "low", "ratio": r} for r in (args.ratio or [0.8])]
    with StepzipClient(args.url, api_key=args.api_key) as client:
        out = client.compress(texts, answers=golds, variants=variants,
                              max_tokens=args.max_tokens)
    if args.json:
        print(out.model_dump_json(indent=2))
    else:
        print_compress_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

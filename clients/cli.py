"""`stepzip`: step-entropy chain-of-thought compression — serve, compress, train, measure.

Start with `stepzip demo` (starts a server on the embedded model and compresses three
GSM8K problems). Every command has its own --help. Errors print one line; add --debug
(anywhere on the line) for the traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

URL_HELP = ("server URL, or several replicas comma-separated "
            "(http://h1:8000,http://h2:8000): work goes to the least busy and moves "
            "off a replica that fails")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        command = getattr(args, "_parser", parser)
        command.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("stepzip: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"stepzip: error: {one_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """A user-facing line for an exception (connection failures get a hint)."""
    import httpx

    if isinstance(exc, httpx.ConnectError):
        try:
            url = exc.request.url
        except RuntimeError:  # raised without a request attached
            url = "the server"
        return f"cannot connect to {url}: is `stepzip serve` running there?"
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("stepzip")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepzip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stepzip {version()}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(metavar="command", title="commands")

    model = sub.add_parser("model", help="manage the embedded default model",
                           description="Manage the embedded default model.")
    model.set_defaults(_parser=model)
    model_sub = model.add_subparsers(metavar="action", title="actions")
    prepare = model_sub.add_parser(
        "prepare", help="convert the embedded GGUF once (idempotent)",
        description="Convert the embedded SmolLM2-135M-Instruct GGUF into a safetensors "
                    "folder in the cache (once; later runs do nothing).")
    prepare.add_argument("--cache-dir", type=Path, default=None,
                         help="cache folder (default: $STEPZIP_MODEL_CACHE or ~/.cache/stepzip)")
    prepare.add_argument("--force", action="store_true", help="convert again")
    prepare.set_defaults(func=cmd_model_prepare)

    serve = sub.add_parser("serve", help="run the HTTP server",
                           description="Run the stepzip HTTP server over a vLLM engine.")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="serve the default model and compress sample problems",
                          description="Start a server (unless --url), compress GSM8K test "
                                      "problems and print the table and one compressed trace.")
    demo.add_argument("--model", default="default",
                      help="model to serve (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--problems", type=int, default=3, help="GSM8K test problems to send")
    demo.add_argument("--max-tokens", type=int, default=192,
                      help="reasoning tokens per problem at most")
    demo.add_argument("--port", type=int, default=0, help="server port (0 = a free one)")
    demo.add_argument("--url", default=None, help="use a running server instead of starting one")
    demo.add_argument("--json", type=Path, default=None, help="also write the response here")
    demo.set_defaults(func=cmd_demo)

    from stepzip.data import ANSWER_FIELD_HELP, DATASET_HELP, QUESTION_FIELD_HELP

    comp = sub.add_parser(
        "compress", help="compress problems with running server(s)",
        description="Compress problems (given as text or from a dataset) with one or more "
                    "running servers; any number of problems, sent in batches.")
    comp.add_argument("problems", nargs="*", help="problem texts (or use --dataset)")
    comp.add_argument("--url", default="http://127.0.0.1:8000", help=URL_HELP)
    comp.add_argument("--api-key", default=None, help="bearer token, if the server has one")
    comp.add_argument("--dataset", default=None, help=DATASET_HELP)
    comp.add_argument("--split", default="test", help="dataset split")
    comp.add_argument("--question-field", default=None, help=QUESTION_FIELD_HELP)
    comp.add_argument("--answer-field", default=None, help=ANSWER_FIELD_HELP)
    comp.add_argument("--limit", type=int, default=3, help="problems to take from --dataset")
    comp.add_argument("--batch-size", type=int, default=8,
                      help="problems per request (capped at the server's --max-problems)")
    comp.add_argument("--concurrency", type=int, default=None,
                      help="requests in flight at once (default: 2 per server)")
    comp.add_argument("--max-tokens", type=int, default=256,
                      help="reasoning tokens per problem at most")
    comp.add_argument("--ratio", type=float, action="append", default=None,
                      help="low-entropy pruning ratio to build; repeat for several "
                           "(default 0.8)")
    comp.add_argument("--preset", choices=("default", "paper-code"), default="default",
                      help="paper-code: the authors' released scripts' rules (T 0.6, top-p "
                           "0.95, their prompt; steps only at an exact '\\n\\n' token, "
                           "mean -p*log p of the sampled token, repeats collapsed, "
                           "int(N*kappa) pruned, joined bare, answers at T 0.6); default: "
                           "the paper's equations (greedy, full-distribution entropy summed "
                           "per step)")
    comp.add_argument("--json", action="store_true", help="print the raw JSON response")
    comp.set_defaults(func=cmd_compress)

    from clients import bench
    from clients import eval as eval_cli
    from clients import score as score_cli
    from trainer import cli as train_cli

    bench.add_parser(sub)
    eval_cli.add_parser(sub)
    score_cli.add_parser(sub)
    train_cli.add_parser(sub)
    _remember_parsers(sub)
    parser.epilog = "every command:\n" + "\n".join(
        f"  stepzip {path:<22} {text}" for path, text in command_list(parser))
    return parser


def _remember_parsers(sub) -> None:
    """A group command given without its action prints its own help, not the top one."""
    for child in sub.choices.values():
        child.set_defaults(_parser=child)
        for action in child._actions:
            if isinstance(action, argparse._SubParsersAction):
                _remember_parsers(action)


def command_list(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str]]:
    """(command path, help) for every runnable (sub)command, in --help order."""
    out = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, child in action.choices.items():
            path = f"{prefix}{name}"
            nested = command_list(child, path + " ")
            out += nested or [(path, helps.get(name) or "")]
    return out


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


GRACEFUL_SHUTDOWN_S = 3


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_args(args)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="info",
                                           # SIGTERM: in-flight requests get this long,
                                           # then are aborted (503); the process exits 0
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    app.state.uvicorn_server = server  # so engine death can stop it and exit 1
    # uvicorn stops on SIGTERM, then raises the signal again once it has stopped; with
    # this handler that ends the process with status 0 (a clean stop, as `vllm serve`)
    # instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
    return app.state.exit_code  # 1 after the engine died, so a supervisor restarts us


def cmd_demo(args) -> int:
    from clients.demo import run_demo

    return run_demo(model=args.model, n_problems=args.problems, max_tokens=args.max_tokens,
                    port=args.port, url=args.url, json_path=args.json)


def cmd_compress(args) -> int:
    from clients.client import StepzipClient
    from clients.report import print_compress_table, progress_bar
    from stepzip.data import load_problems

    texts = list(args.problems)
    golds: list[str | None] = [None] * len(texts)
    ids: list[str | None] = [f"#{i + 1}" for i in range(len(texts))]
    if args.dataset:
        problems = load_problems(args.dataset, args.split, limit=args.limit,
                                 question_field=args.question_field,
                                 answer_field=args.answer_field)
        texts += [p.question for p in problems]
        golds += [p.answer for p in problems]
        ids += [p.id for p in problems]
    if not texts:
        raise ValueError("give problem texts or --dataset")
    variants = [{"strategy": "low", "ratio": r} for r in (args.ratio or [0.8])]
    with StepzipClient(args.url, api_key=args.api_key, max_problems=args.batch_size) as client, \
            progress_bar(f"compressing on {len(client.urls)} server(s)", len(texts)) as bar:
        started = time.perf_counter()
        out = client.compress(texts, answers=golds, ids=ids, variants=variants,
                              max_tokens=args.max_tokens, progress=bar,
                              concurrency=args.concurrency, preset=args.preset)
        wall_s = time.perf_counter() - started
    for note in out.notes:
        print(f"stepzip: note: {note}", file=sys.stderr)
    if args.json:
        print(out.model_dump_json(indent=2))
    else:
        print_compress_table(out, wall_s=wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MkDocs hook: the command-line and HTTP references, generated at build time from the
real argparse parser (`clients.cli.build_parser`) and the app's OpenAPI schema
(`server.app.create_app`, with an engine that is never started), so they cannot drift
from the code. A new flag, command or route appears in the next build by itself.

Request examples are written here by hand (a generated one would fill every optional
vLLM field) and validated against the route's schema on every build: an example that no
longer fits its route is a warning, which `mkdocs build --strict` turns into a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Pictures the pages show, served from where the runs wrote them (no copies to go stale).
ASSETS = {
    "img/eval-svamp40-accuracy_vs_kappa.png":
        "clients/results/eval-svamp40/accuracy_vs_kappa.png",
    "img/cpu-demo-grpo.png": "trainer/results/cpu-demo/grpo.png",
    "img/cpu-demo-heldout.png": "trainer/results/cpu-demo/heldout.png",
}
CLI_INDEX = "reference/cli/index.md"
ROUTES_INDEX = "reference/routes/index.md"
log = logging.getLogger("mkdocs.hooks.reference")

# Request bodies shown on the route pages; each is checked against the route's schema.
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/compress"): {
        "problems": [{"text": "Tom has 3 apples and buys 4 more. How many?", "answer": "7"}],
        "sampling": {"max_tokens": 128},
        "variants": [{"strategy": "low", "ratio": 0.5}, {"strategy": "low", "ratio": 0.8}],
    },
    ("post", "/v1/score"): {
        "pairs": [{"problem": "Tom has 3 apples and buys 4 more. How many?",
                   "reasoning": "Tom starts with 3 apples.\nHe buys 4 more.\n3 + 4 = 7.\n"
                                "The answer is 7",
                   "answer": "7"}],
        "variants": [{"strategy": "low", "ratio": 0.5}], "answer": True,
    },
    ("post", "/v1/completions"): {
        "prompt": ["What is 3 + 4?"], "n": 14, "max_tokens": 64,
        "temperature": 1.0, "logprobs": 0, "return_token_ids": True,
        "stepzip": {"entropies": True, "steps": True},
    },
    ("post", "/v1/chat/completions"): {
        "messages": [{"role": "user", "content": "What is 3 + 4?"}],
        "max_tokens": 64, "stepzip": {"steps": True},
    },
    ("post", "/tokenize"): {"prompt": "What is 3 + 4?"},
    ("post", "/detokenize"): {"tokens": [1, 2, 3]},
    ("post", "/v1/weights/load"): {"path": "/runs/grpo/sync/step-000001", "checksum": True},
}


# ---- mkdocs events -------------------------------------------------------------------------

_pages: dict[str, str] = {}


def on_config(config: Any) -> Any:
    sys.path.insert(0, str(ROOT))
    _pages.clear()
    _pages.update(cli_pages())
    _pages.update(route_pages())
    config["nav"] = _expand_nav(config["nav"])
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for src, text in _pages.items():
        files.append(File.generated(config, src, content=text))
    for src, origin in ASSETS.items():
        files.append(File.generated(config, src, abs_src_path=str(ROOT / origin)))
    return files


def _expand_nav(nav: list) -> list:
    """The two index entries become sections holding every generated page."""
    out = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if value in (CLI_INDEX, ROUTES_INDEX):
                prefix = value.removesuffix("index.md")
                children = [{"Overview": value}] + [
                    {_title(_pages[src]): src} for src in _pages
                    if src.startswith(prefix) and src != value]
                item = {title: children}
            elif isinstance(value, list):
                item = {title: _expand_nav(value)}
        out.append(item)
    return out


def _title(markdown: str) -> str:
    return markdown.splitlines()[0].removeprefix("# ").strip("`")


# ---- the command line ----------------------------------------------------------------------


def cli_pages() -> dict[str, str]:
    """docs path -> markdown: an index, then one page per runnable command."""
    from clients.cli import build_parser, command_list

    parser = build_parser()
    commands = command_list(parser)
    intro = ("Generated from the parser in `clients/cli.py` at every docs build. Every "
             "command has its own `--help`; `--debug` anywhere on the line shows a traceback "
             "instead of the one-line error. `stepzip serve` flags also read "
             "`STEPZIP_<FLAG>` from the environment.")
    index = ["# Command line", "", intro, "", "| command | what it does |", "| --- | --- |"]
    pages = {}
    for path, text in commands:
        src = cli_page_path(path)
        index.append(f"| [`stepzip {path}`]({src.removeprefix('reference/cli/')}) | "
                     f"{_cell(text)} |")
        pages[src] = _command_page(path, text, _subparser(parser, path.split()))
    index += ["", "Options of `stepzip` itself:", "", *_options_table(parser)]
    return {CLI_INDEX: "\n".join(index) + "\n", **pages}


def cli_page_path(command: str) -> str:
    return f"reference/cli/{command.replace(' ', '-')}.md"


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _command_page(path: str, text: str, parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [f"# `stepzip {path}`", "", f"{text[:1].upper()}{text[1:]}.", "",
             "```text", usage, "```", ""]
    if parser.description:
        lines += ["```text", parser.description.strip(), "```", ""]
    lines += ["## Options", "", *_options_table(parser)]
    return "\n".join(lines) + "\n"


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | description |", "| --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}`"
        if action.option_strings and action.nargs != 0:
            names += f" `{action.metavar or action.dest.upper()}`"
        help_text = action.help or ""
        if action.choices and not isinstance(action.choices, dict):
            help_text += " (one of: " + ", ".join(str(c) for c in action.choices) + ")"
        if (action.default not in (None, False, [], argparse.SUPPRESS)
                and "default" not in help_text):
            help_text += f" (default: {action.default})"
        rows.append(f"| {names} | {_cell(help_text)} |")
    return rows


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: outside `code` spans (which keep their
    text as it is), pipes would end the cell, `<x>` would be an HTML tag, `*` emphasis."""
    parts = " ".join(str(text).split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts)


# ---- the HTTP routes -----------------------------------------------------------------------


def openapi_schema() -> dict[str, Any]:
    """The served /openapi.json, from an app whose engine is never started."""
    from server.app import create_app
    from server.engine.engine import Engine
    from server.settings import ServerSettings

    settings = ServerSettings()
    return create_app(settings, Engine(settings)).openapi()


def routes(spec: dict[str, Any]) -> list[tuple[str, str, dict]]:
    """(method, path, operation) for every operation in the schema."""
    return [(method, path, op) for path, ops in spec["paths"].items()
            for method, op in ops.items()]


def route_page_path(method: str, path: str) -> str:
    slug = path.strip("/").replace("/", "-").replace("_", "-") or "root"
    return f"reference/routes/{method}-{slug}.md"


def route_pages() -> dict[str, str]:
    spec = openapi_schema()
    intro = ("Generated from the server's OpenAPI schema (`/openapi.json`; `/docs` and "
             "`/redoc` on a running server) at every docs build. Routes `vllm serve` also "
             "has answer with vLLM's error body, stepzip's own routes with the richer "
             "`ErrorBody`; [Concepts](../../concepts.md) explains what the fields mean. "
             "The trace viewer (`GET /viewer/`) is static HTML, not in the schema.")
    index = ["# HTTP routes", "", intro, "", "| route | group | summary |",
             "| --- | --- | --- |"]
    pages = {}
    for method, path, op in routes(spec):
        src = route_page_path(method, path)
        tag = ", ".join(op.get("tags", []))
        index.append(f"| [`{method.upper()} {path}`]({src.removeprefix('reference/routes/')})"
                     f" | {tag} | {_cell(op.get('summary', ''))} |")
        pages[src] = _route_page(spec, method, path, op)
    return {ROUTES_INDEX: "\n".join(index) + "\n", **pages}


def _route_page(spec: dict, method: str, path: str, op: dict) -> str:
    lines = [f"# `{method.upper()} {path}`", ""]
    if op.get("description"):
        lines += [op["description"].strip(), ""]
    body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {})
    schema = body.get("schema")
    if schema is not None:
        lines += ["## Request body", "", f"Schema: {_type(schema)}.", "",
                  *_fields_table(spec, schema), ""]
        example = EXAMPLES.get((method, path))
        if example is not None:
            _check_example(spec, schema, example, method, path)
        else:
            example = _example(spec, schema, required_only=True)
        lines += ["Example:", "", "```bash",
                  f"curl -s localhost:8000{path} -H 'content-type: application/json' -d '"
                  + json.dumps(example, indent=2).replace("'", "'\\''") + "'",
                  "```", ""]
    else:
        flag = " -X POST" if method == "post" else ""
        lines += ["Example:", "", "```bash", f"curl -s{flag} localhost:8000{path}", "```", ""]
    lines += ["## Responses", "", "| status | meaning | body |", "| --- | --- | --- |"]
    ok_schema = None
    for status, answer in op.get("responses", {}).items():
        content = answer.get("content", {})
        shape = content.get("application/json", {}).get("schema")
        kinds = ", ".join(sorted(content)) or "-"
        if shape:
            kinds = f"{_type(shape)} ({kinds})"
        lines.append(f"| {status} | {_cell(answer.get('description', ''))} | {kinds} |")
        if status.startswith("2") and shape:
            ok_schema = shape
    if ok_schema:
        lines += ["", "Shape of a successful response (generated from its schema; values are "
                  + "placeholders):", "", "```json",
                  json.dumps(_example(spec, ok_schema, required_only=False), indent=2),
                  "```"]
    return "\n".join(lines) + "\n"


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _type(schema: dict) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type(s) for s in schema[key])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    return f"`{schema.get('type', 'any')}`"


def _fields_table(spec: dict, schema: dict) -> list[str]:
    resolved = _resolve(spec, schema)
    props = resolved.get("properties")
    if not props:
        return []
    required = set(resolved.get("required", []))
    rows = ["| field | type | required | default | description |",
            "| --- | --- | --- | --- | --- |"]
    for name, prop in props.items():
        default = json.dumps(prop["default"]) if "default" in prop else ""
        rows.append(f"| `{name}` | {_type(prop)} | {'yes' if name in required else ''} | "
                    f"{_cell(default)} | {_cell(prop.get('description', ''))} |")
    return rows


def _example(spec: dict, schema: dict, *, required_only: bool, depth: int = 0) -> Any:
    """A value of the schema's shape: defaults where given, placeholders elsewhere."""
    schema = _resolve(spec, schema)
    if schema.get("examples"):
        return schema["examples"][0]
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _example(spec, options[0], required_only=required_only, depth=depth)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        if depth > 6:
            return {}
        required = set(schema.get("required", []))
        return {name: _example(spec, prop, required_only=required_only, depth=depth + 1)
                for name, prop in schema.get("properties", {}).items()
                if not required_only or name in required}
    if kind == "array":
        if depth > 6:
            return []
        return [_example(spec, schema.get("items", {}), required_only=required_only,
                         depth=depth + 1)]
    return {"string": "string", "integer": 0, "number": 0.0, "boolean": False}.get(kind)


def _check_example(spec: dict, schema: dict, example: dict, method: str, path: str) -> None:
    import jsonschema

    wrapped = {**schema, "components": spec["components"]}
    try:
        jsonschema.validate(example, wrapped)
    except jsonschema.ValidationError as exc:
        log.warning("docs example for %s %s does not fit its schema: %s", method.upper(),
                    path, exc.message)

"""The README and the documentation site: the site builds with `mkdocs build --strict`
(offline: no web fonts, no social cards), every command and every route has its
generated reference page, every `stepzip ...` command shown in a code block parses with
the real parser, and the README stays a page that fits a screen or four."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")

from clients.cli import build_parser, command_list

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.MULTILINE | re.DOTALL)
OPERATORS = {"&&", "||", "&", ";", "|", "(", ")"}


def _hooks():
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    return hooks


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_site_builds_strict_and_offline(site) -> None:
    assert (site / "index.html").is_file() and (site / "search" / "search_index.json").is_file()
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, page
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["font"] is False  # Material would link Google Fonts
    assert "social" not in str(config["plugins"])  # social cards fetch fonts at build time


def test_every_command_has_a_reference_page_with_each_option(site) -> None:
    hooks = _hooks()
    parser = build_parser()
    for path, _ in command_list(parser):
        page = site / hooks.cli_page_path(path).removesuffix(".md") / "index.html"
        assert page.is_file(), f"no reference page for `stepzip {path}`"
        text = page.read_text(encoding="utf-8")
        for action in hooks._subparser(parser, path.split())._actions:
            for flag in action.option_strings:
                assert flag in text, f"{flag} missing from the page of `stepzip {path}`"


def test_every_route_has_a_reference_page(site) -> None:
    hooks = _hooks()
    operations = hooks.routes(hooks.openapi_schema())
    assert len(operations) >= 20
    for method, path, _ in operations:
        page = site / hooks.route_page_path(method, path).removesuffix(".md") / "index.html"
        assert page.is_file(), f"no reference page for {method.upper()} {path}"
        assert f"{method.upper()} {path}" in page.read_text(encoding="utf-8")


def test_route_examples_fit_their_schemas() -> None:
    """The hand-written examples are the routes' own (the build warns, strict fails, on a
    mismatch); here each also validates against the request model the route uses."""
    from stepzip.schemas.compress import CompressRequest
    from stepzip.schemas.score import ScoreRequest

    hooks = _hooks()
    CompressRequest.model_validate(hooks.EXAMPLES[("post", "/v1/compress")])
    ScoreRequest.model_validate(hooks.EXAMPLES[("post", "/v1/score")])
    spec = hooks.openapi_schema()
    for (method, path), example in hooks.EXAMPLES.items():
        schema = spec["paths"][path][method]["requestBody"]["content"]["application/json"]
        import jsonschema

        jsonschema.validate(example, {**schema["schema"], "components": spec["components"]})


def stepzip_commands(text: str) -> list[list[str]]:
    """argv (after `stepzip`) of every stepzip call in the text's shell code blocks."""
    calls = []
    for block in SHELL_BLOCK.findall(text):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            try:
                words = list(lexer)
            except ValueError:  # a quote spans lines (a JSON body): read on
                continue
            pending = ""
            calls += _calls(words)
    return calls


def _calls(words: list[str]) -> list[list[str]]:
    calls, segment = [], []
    for word in [*words, ";"]:
        if word not in OPERATORS:
            segment.append(word)
            continue
        while segment and "=" in segment[0] and not segment[0].startswith("-"):
            segment.pop(0)  # VAR=value before the command
        if segment and Path(segment[0]).name == "stepzip":
            calls.append(segment[1:])
        segment = []
    return calls


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_stepzip_commands_in_the_docs_parse(page) -> None:
    commands = {path for path, _ in command_list(build_parser())}
    for argv in stepzip_commands(page.read_text(encoding="utf-8")):
        shown = f"`stepzip {shlex.join(argv)}` in {page.relative_to(ROOT)}"
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, f"{shown} does not parse"
            continue
        assert hasattr(args, "func"), f"{shown} names no command"
        assert any(" ".join(argv).startswith(c) for c in commands), shown


def test_the_code_block_reader_finds_commands() -> None:
    text = ("```bash\n.venv/bin/stepzip serve --port 8000 &   # the server\n"
            "X=1 stepzip compress --url http://h:1 \\\n  --limit 3 && echo done\n"
            "curl -d '{\n  \"a\": 1}'\n```\n```text\nstepzip nothing\n```\n")
    assert stepzip_commands(text) == [["serve", "--port", "8000"],
                                      ["compress", "--url", "http://h:1", "--limit", "3"]]
    found = sum(len(stepzip_commands(p.read_text(encoding="utf-8"))) for p in PAGES)
    assert found >= 15  # the docs really show commands, and this reads them


def test_readme_fits_keeps_the_two_commands_and_links_only_what_exists() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "bash docker/setup.sh && .venv/bin/stepzip demo" in readme
    assert "bash docker/setup.sh && .venv/bin/python -m pytest -q" in readme
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing {target}"

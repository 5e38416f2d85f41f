"""The `stepzip` command line as a user meets it: help for everything, --version, one-line
errors, batching beyond the server's per-request limit, a table that fits 80 columns."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from replica_http import Replica, compress_answer
from rich.console import Console

from clients.cli import build_parser, command_list, main
from clients.report import print_compress_table
from stepzip.schemas import compress as schemas

STEPZIP = [str(Path(sys.executable).with_name("stepzip"))]


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the top parser and every (nested) subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, (*path, name))


def help_text(action: argparse.Action) -> str:
    """The help without the "(default: ...)" note config.add_flags appends."""
    text = action.help if action.help not in (None, argparse.SUPPRESS) else ""
    return re.sub(r"\(default: .*\)$", "", text).strip()


def test_every_option_and_subcommand_has_help_text():
    missing = []
    for path, parser in walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: help_text(a) for a in action._choices_actions}
                missing += [(*path, name) for name in action.choices if not helps.get(name)]
            elif not help_text(action):
                missing.append((*path, "/".join(action.option_strings) or action.dest))
    assert missing == [], f"no help text: {missing}"


def test_top_help_lists_every_runnable_command():
    paths = [p for p, _ in command_list(build_parser())]
    assert {"serve", "compress", "demo", "train grpo", "bench rollout"} <= set(paths)
    text = subprocess.run([*STEPZIP, "--help"], capture_output=True, text=True,
                          check=True).stdout
    for path in paths:
        assert f"stepzip {path} " in text, f"`stepzip --help` does not list `{path}`"


def test_every_subcommand_help_runs_and_shows_each_option():
    commands = [(path, parser) for path, parser in walk(build_parser()) if path]

    def run(item):
        path, parser = item
        done = subprocess.run([*STEPZIP, *path, "--help"], capture_output=True, text=True, check=False)
        return path, parser, done

    with ThreadPoolExecutor(4) as pool:
        for path, parser, done in pool.map(run, commands):
            assert done.returncode == 0, f"stepzip {' '.join(path)} --help: {done.stderr}"
            for action in parser._actions:
                for flag in action.option_strings:
                    assert flag in done.stdout, f"{flag} missing from {' '.join(path)} --help"


def test_version():
    done = subprocess.run([*STEPZIP, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"stepzip \d+\.\d+\.\d+\S*\n", done.stdout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_are_one_line_unless_debug():
    url = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run([*STEPZIP, "compress", "--url", url, "what is 1+1?"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stepzip: error: cannot connect to "), \
        done.stderr
    debug = subprocess.run([*STEPZIP, "compress", "--url", url, "what is 1+1?", "--debug"],
                           capture_output=True, text=True, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_input_names_the_problem(capsys):
    assert main(["compress", "--url", "http://127.0.0.1:1"]) == 1
    assert "give problem texts or --dataset" in capsys.readouterr().err
    assert main(["compress", "--url", "localhost:8000", "q"]) == 1
    assert "must start with http://" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["compress", "--no-such-flag"])
    assert info.value.code == 2
    assert main(["train"]) == 2  # a group without its stage: its own help
    assert "build-sft" in capsys.readouterr().out


def test_compress_batches_beyond_the_servers_limit(capsys):
    a, b = Replica(max_problems=64), Replica(max_problems=64)
    try:
        code = main(["compress", "--url", f"{a.url},{b.url}", "--dataset", "gsm8k",
                     "--limit", "70", "--batch-size", "64", "--json"])
    finally:
        a.close()
        b.close()
    assert code == 0
    out = schemas.CompressResponse.model_validate_json(capsys.readouterr().out)
    assert [r.id for r in out.results] == [f"gsm8k-test-{i}" for i in range(70)]
    sizes = sorted(len(chunk) for chunk in a.seen + b.seen)
    assert sizes == [6, 64] and a.seen and b.seen


def test_table_fits_80_columns_and_shows_ids():
    ids = ["gsm8k-test-1318", "#2", "math500-test-499-precalculus"]
    body = {"problems": [{"text": "q", "id": i, "answer": "1234567890123456"} for i in ids],
            "variants": [{"ratio": 0.5}, {"ratio": 0.8}]}
    out = schemas.CompressResponse.model_validate(compress_answer(body))
    console = Console(width=80, record=True, force_terminal=True)
    print_compress_table(out, console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum("low 0.5" in line for line in lines) == 3  # one line per variant row
    for i in ids[:2]:
        assert any(i in line for line in lines), f"id {i} not shown"
    assert any("math500-test-499" in line for line in lines)  # cut with an ellipsis


def test_time_line_names_wall_time_and_summed_request_time(capsys):
    """Chunks run side by side: the servers' times add up over requests, which is not the
    time the user waited; the line says which is which."""
    replica = Replica(max_problems=2)
    try:
        assert main(["compress", "--url", replica.url, "--dataset", "gsm8k", "--limit", "6",
                     "--batch-size", "2"]) == 0
    finally:
        replica.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time:"))
    # Three requests of a made-up 1.0 s each (0.5 s generating), answered at once.
    assert "request time summed over requests 3.00 s (generate 1.50 s" in line
    assert float(re.search(r"time: wall ([\d.]+) s;", line).group(1)) < 3.0

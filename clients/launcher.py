"""Start a stepzip (or vLLM) server as a child process and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(["serve", "--max-model-len", "1024"]) as server: server.url`.

    `argv` are `stepzip` arguments; `command` replaces the whole command line (e.g. vLLM's
    own server). Output goes to `log_path` (a temp file by default) so a failed start can
    show its tail.
    """

    def __init__(self, argv: list[str] | None = None, *, command: list[str] | None = None,
                 port: int | None = None, env: dict | None = None, log_path: Path | None = None,
                 ready_path: str = "/health", timeout: float = 600.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if command is None:
            command = [sys.executable, "-m", "clients.cli", *(argv or []),
                       "--port", str(self.port)]
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or Path(f"/tmp/stepzip-server-{self.port}.log")
        self.ready_path = ready_path
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # `with` does not call __exit__ when __enter__ raises
            raise

    def _start(self) -> None:
        started = time.perf_counter()
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = httpx.get(self.url + self.ready_path, timeout=5)
                if r.status_code == 200:
                    self.startup_s = time.perf_counter() - started
                    return
                if r.status_code == 503 and r.json().get("status") == "failed":
                    raise RuntimeError(f"server start-up failed: {r.text}\n{self.tail()}")
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {self.timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

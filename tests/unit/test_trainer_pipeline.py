"""The pipeline's own pieces without an engine: server start with progress lines, the
marker-share probe, the server arguments."""

from __future__ import annotations

import threading

import pytest

from trainer import pipeline


class SlowServer:
    """ServerProcess's surface: start() blocks until ready; tail() is its log."""

    url = "http://127.0.0.1:1"
    log_path = "/tmp/x.log"

    def __init__(self, fail: bool = False):
        self.fail, self.release = fail, threading.Event()

    def start(self) -> None:
        self.release.wait(5)
        if self.fail:
            raise RuntimeError("engine died")

    def tail(self, n: int = 60) -> str:
        return 'INFO loading weights\nINFO:  127.0.0.1 - "GET /health HTTP/1.1" 503\n'


def test_server_start_says_what_it_waits_for() -> None:
    server, lines = SlowServer(), []
    threading.Timer(0.3, server.release.set).start()
    pipeline.start_server(server, "GRPO", lines.append, every=0.05)
    waiting = [line for line in lines if "waiting" in line]
    assert waiting and all("INFO loading weights" in line for line in waiting)
    assert "ready" in lines[-1]


def test_server_start_failure_is_raised() -> None:
    server = SlowServer(fail=True)
    server.release.set()
    with pytest.raises(RuntimeError, match="engine died"):
        pipeline.start_server(server, "GRPO", lambda m: None, every=0.05)


def test_marker_share_counts_completions_with_skips(monkeypatch) -> None:
    bodies = []

    class Client:
        def __init__(self, url):
            pass

        def completions(self, body):
            bodies.append(body)
            stats = [{"n_skips": 2, "skip_ratio": 0.5}, {"n_skips": 0, "skip_ratio": 0.0},
                     {"n_skips": 3, "skip_ratio": 0.75}, {}]
            return {"choices": [{"text": "t", "stepzip": s} for s in stats]}

        def close(self):
            pass

    monkeypatch.setattr(pipeline, "StepzipClient", Client)
    probe = pipeline.marker_share("http://x", ["p1", "p2"], marker="[SKIP]", delimiter="\n",
                                  samples=2, max_tokens=8, temperature=1.0)
    assert probe["completions"] == 4 and probe["with_marker"] == 2
    assert probe["share"] == 0.5 and probe["mean_skip_ratio"] == pytest.approx(1.25 / 4)
    assert bodies[0]["n"] == 2 and bodies[0]["stepzip"] == {"marker": "[SKIP]",
                                                            "delimiter": "\n"}
    assert "2/4" in pipeline.share_line("after SFT", probe)

"""Hostile answers through the server: grading is bounded by --grading-timeout, runs off
the event loop (/health keeps answering), and SIGTERM stops a server that is busy
grading and generating, with status 0."""

from __future__ import annotations

import asyncio
import signal
import statistics
import threading
import time

import httpx

from clients.launcher import ServerProcess
from tests.integration.conftest import GRADING_TIMEOUT

SLACK = 1.0  # every case ends within the deadline + 1 s
# Each ran > 8 s with no end in sight through in-process math-verify (tests/unit/test_grader.py).
HOSTILE = ["9^{9^{9}}", "10^{10^{10^{10}}}", "(10^{10})!", "\\binom{10^{12}}{10^{6}}",
           "\\prod_{k=1}^{10^{9}} k", "(x+1)^{10^{6}}"]
PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"


class HealthProbe:
    """Polls /health every 50 ms in a thread; latencies in seconds."""

    def __init__(self, url: str):
        self.url, self.latencies, self.statuses = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                status = http.get("/health").status_code
                self.latencies.append(time.monotonic() - started)
                self.statuses.append(status)
                time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98]


def graded_outputs(body: dict):
    """Every trace, and every variant that was answered (each carries a grade)."""
    for problem in body["results"]:
        for trace in problem["traces"]:
            yield trace
            yield from (v for v in trace["variants"] if v["answer_text"] is not None)


def test_hostile_golds_and_answers_are_bounded_and_health_answers(server):
    cases = []
    with HealthProbe(server.url) as probe, httpx.Client(base_url=server.url,
                                                        timeout=300) as http:
        for hostile in HOSTILE:
            # The gold: /v1/compress, the model's own answer graded against it.
            r = http.post("/v1/compress", json={
                "problems": [{"text": PROBLEM, "answer": hostile}],
                "sampling": {"max_tokens": 24}, "answer": False})
            cases.append(("compress gold", hostile, r))
            # The model's answer (and both): /v1/score grades the given reasoning's answer.
            for gold in ("7", hostile):
                r = http.post("/v1/score", json={
                    "pairs": [{"problem": PROBLEM, "answer": gold,
                               "reasoning": f"3 + 4 = 7.\nThe answer is \\boxed{{{hostile}}}."}],
                    "answer": False})
                cases.append(("score answer" if gold == "7" else "score both", hostile, r))
        # Answering from variants too: two grading batches, each bounded.
        r = http.post("/v1/compress", json={
            "problems": [{"text": PROBLEM, "answer": HOSTILE[0]}],
            "sampling": {"max_tokens": 24}, "answer": True, "answer_max_tokens": 8,
            "variants": [{"strategy": "low", "ratio": 0.5}]})
        cases.append(("compress answers", HOSTILE[0], r))
        metrics = http.get("/metrics").text
    worst = 0.0
    for kind, hostile, r in cases:
        assert r.status_code == 200, (kind, hostile, r.text)
        body = r.json()
        batches = 2 if kind == "compress answers" else 1
        grade_s = body["timings"]["grade_s"]
        worst = max(worst, grade_s / batches)
        assert grade_s <= batches * (GRADING_TIMEOUT + SLACK), (kind, hostile, grade_s)
        outputs = list(graded_outputs(body))
        # The same string on both sides is equal as text, before any sympy.
        allowed = ("ungradable", "wrong", "correct") if kind == "score both" \
            else ("ungradable", "wrong")
        assert outputs and all(o["grade"] in allowed for o in outputs), \
            (kind, hostile, [(o["grade"], o["extracted_answer"]) for o in outputs])
        for o in outputs:
            if o["grade"] == "ungradable":
                assert o["correct"] is None and o["grade_reason"]
        if kind.startswith("score"):  # the hostile string was what got graded
            assert body["results"][0]["traces"][0]["extracted_answer"] == hostile
    ungradable = sum(o["grade"] == "ungradable" for _, _, r in cases
                     for o in graded_outputs(r.json()))
    assert ungradable >= len(HOSTILE)
    assert 'stepzip_grades_total{outcome="ungradable"}' in metrics
    assert set(probe.statuses) == {200}
    print(f"\n{len(cases)} hostile requests: worst grading {worst:.2f} s per batch "
          f"(deadline {GRADING_TIMEOUT} s), {ungradable} ungradable answers; /health p99 "
          f"{probe.p99() * 1000:.0f} ms over {len(probe.latencies)} polls")
    assert probe.p99() < 0.5


def test_sigterm_stops_a_server_busy_grading_and_generating(default_model_dir):
    """32 generations in flight and two requests stuck grading (60 s deadline): SIGTERM
    ends the process within 15 s with status 0, as `vllm serve` does."""
    argv = ["serve", "--model", str(default_model_dir), "--dtype", "float32",
            "--max-model-len", "512", "--max-num-seqs", "64", "--kv-cache-gib", "1",
            "--step-delimiter", "\\n", "--grading-timeout", "60"]
    with ServerProcess(argv, timeout=600) as server:
        async def load_and_stop() -> tuple[float, int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 400,
                        "temperature": 0.8, "ignore_eos": True}
                gens = [asyncio.create_task(http.post("/v1/completions", json=body))
                        for _ in range(32)]
                grading = [asyncio.create_task(http.post("/v1/score", json={
                    "pairs": [{"problem": PROBLEM, "answer": hostile,
                               "reasoning": "The answer is \\boxed{7}."}],
                    "answer": False})) for hostile in HOSTILE[:2]]
                await asyncio.sleep(4)  # generating, and grading past any short deadline
                in_flight = sum(not t.done() for t in gens + grading)
                assert in_flight >= 30, f"only {in_flight} requests in flight"
                sent = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                while server.proc.poll() is None and time.monotonic() - sent < 30:
                    await asyncio.sleep(0.1)
                took = time.monotonic() - sent
                answers = await asyncio.gather(*gens, *grading, return_exceptions=True)
                # Finished, or aborted with a 503 saying why; never a 500.
                statuses = [a.status_code for a in answers if isinstance(a, httpx.Response)]
                assert set(statuses) <= {200, 503}, statuses
                return took, in_flight

        took, in_flight = asyncio.run(load_and_stop())
        code = server.proc.poll()
        print(f"\nSIGTERM with {in_flight} requests in flight: exited {code} after {took:.1f} s")
        assert code == 0, server.tail()
        assert took <= 15, server.tail()

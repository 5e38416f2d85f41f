"""Killing the engine core under load: /health turns 503 within seconds, every in-flight
request is answered 503 (a stream ends with an error event), and the server exits with a
non-zero status so a supervisor restarts it. Needs its own (small) server."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil

from clients.launcher import ServerProcess


def _engine_core(pid: int) -> psutil.Process:
    children = psutil.Process(pid).children(recursive=True)
    for child in children:
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no engine core among {[(c.pid, c.name()) for c in children]}")


def test_killed_engine_core_gives_503s_and_a_nonzero_exit(default_model_dir):
    argv = ["serve", "--model", str(default_model_dir), "--dtype", "float32",
            "--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-gib", "1"]
    with ServerProcess(argv, timeout=600) as server:
        core = _engine_core(server.proc.pid)

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 400,
                        "temperature": 0.8, "ignore_eos": True}
                plain = [asyncio.create_task(http.post("/v1/completions", json=body))
                         for _ in range(6)]
                compress = [asyncio.create_task(http.post("/v1/compress", json={
                    "problems": [{"text": "Count to one hundred."}],
                    "sampling": {"max_tokens": 400}})) for _ in range(2)]

                async def stream() -> tuple[int, str]:
                    async with http.stream("POST", "/v1/completions",
                                           json={**body, "stream": True}) as r:
                        return r.status_code, (await r.aread()).decode()

                streams = [asyncio.create_task(stream()) for _ in range(2)]
                await asyncio.sleep(3)  # generating now
                # requests already answered (a short greedy trace) are not in flight
                in_flight = {id(t) for t in plain + compress + streams if not t.done()}
                assert len(in_flight) >= 6
                killed_at = time.monotonic()
                os.kill(core.pid, signal.SIGKILL)
                health_503_after = None
                while time.monotonic() - killed_at < 30:
                    try:
                        if (await http.get("/health")).status_code == 503:
                            health_503_after = time.monotonic() - killed_at
                            break
                    except httpx.TransportError:
                        break  # already gone: exited even sooner
                    await asyncio.sleep(0.1)
                await asyncio.gather(*plain, *compress, *streams, return_exceptions=True)
                answers = [t.exception() or t.result() for t in plain + compress
                           if id(t) in in_flight]
                streamed = [t.exception() or t.result() for t in streams if id(t) in in_flight]
                return health_503_after, answers, streamed

        health_503_after, answers, streamed = asyncio.run(run())
        print(f"/health 503 {health_503_after} s after the kill")
        assert health_503_after is not None and health_503_after < 5
        for r in answers:
            assert isinstance(r, httpx.Response), repr(r)
            assert r.status_code == 503 and "engine is dead" in r.text, r.text[:300]
        for item in streamed:
            assert not isinstance(item, Exception), repr(item)
            status, text = item
            assert status == 503 or '"error"' in text, text[-300:]
        code = server.proc.wait(timeout=60)
        print(f"server exited with status {code}")
        assert code == 1  # `stepzip serve` exits 1, not by a signal

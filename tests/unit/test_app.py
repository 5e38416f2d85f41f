"""HTTP layer without an engine: 503 while the engine starts, 4xx shapes, API key, gate."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.engine import Engine
from server.settings import ServerSettings
from server.weightgate import WeightGate


class StartingEngine(Engine):
    """An engine whose start-up never finishes (the real one takes 25-120 s on a CPU)."""

    async def start(self) -> None:
        await asyncio.Event().wait()


class FailingEngine(Engine):
    async def start(self) -> None:
        raise RuntimeError("no such model")


def make_client(engine_cls=StartingEngine, **settings) -> TestClient:
    s = ServerSettings(**settings)
    return TestClient(create_app(s, engine_cls(s)))


def test_health_and_routes_are_503_while_starting():
    with make_client() as client:
        assert client.get("/health").status_code == 503
        assert client.get("/health").json()["status"] == "starting"
        r = client.post("/v1/compress", json={"problems": [{"text": "1+1?"}]})
        assert r.status_code == 503
        assert r.headers["retry-after"]
        r = client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503


def test_failed_start_up_is_reported_by_health():
    with make_client(FailingEngine) as client:
        body = client.get("/health").json()
        assert body["status"] == "failed" and "no such model" in body["error"]


def test_validation_errors_name_field_and_reason_even_before_ready():
    with make_client() as client:
        r = client.post("/v1/compress", json={"problems": [{"text": "x"}],
                                              "variants": [{"ratio": -0.1}]})
        assert r.status_code == 422
        detail = r.json()["details"][0]
        assert detail["field"].startswith("variants.0") and "ratio" in detail["reason"]
        r = client.post("/v1/compress", json={"problems": "not a list"})
        assert r.status_code == 422 and r.json()["details"][0]["field"] == "problems"


def test_api_key_guards_everything_but_health():
    with make_client(api_key="sekret") as client:
        assert client.get("/health").status_code == 503  # reachable without a key
        r = client.get("/v1/models")
        assert r.status_code == 401 and r.json()["details"][0]["field"] == "authorization"
        ok = client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


def test_weight_routes_are_off_unless_enabled():
    with make_client() as client:
        assert client.post("/v1/weights/load", json={"path": "/tmp"}).status_code in (404, 503)


def test_metrics_are_prometheus_text():
    with make_client() as client:
        client.get("/health")
        text = client.get("/metrics").text
        assert 'stepzip_requests_total{route="/health",status="503"}' in text


def test_weight_gate_update_waits_for_generations_and_blocks_new_ones():
    async def scenario() -> list[str]:
        gate, log = WeightGate(), []

        async def generation(name: str, hold: float) -> None:
            async with gate.generation():
                log.append(f"start {name}")
                await asyncio.sleep(hold)
                log.append(f"end {name}")

        async def update() -> None:
            async with gate.exclusive():
                log.append("update")
                await asyncio.sleep(0.02)
                log.append("update done")

        first = asyncio.create_task(generation("a", 0.05))
        await asyncio.sleep(0.01)
        upd = asyncio.create_task(update())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(generation("b", 0.0))
        await asyncio.gather(first, upd, late)
        return log

    log = asyncio.run(scenario())
    assert log == ["start a", "end a", "update", "update done", "start b", "end b"]


@pytest.mark.parametrize("flag,value", [("--max-model-len", "4096"), ("--no-entropy", None)])
def test_serve_flags_map_to_settings(flag, value):
    from clients.cli import build_parser, settings_from_args

    argv = ["serve", flag] + ([value] if value else [])
    s = settings_from_args(build_parser().parse_args(argv))
    if value:
        assert s.max_model_len == 4096
    else:
        assert s.entropy is False
    assert s.step_delimiter == "\n"  # default model -> single-newline steps

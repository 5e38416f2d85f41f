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
        r = client.post("/v1/compress", json={"problems": [{"text": "1+1?"}]})
        assert r.status_code == 401 and r.json()["details"][0]["field"] == "authorization"
        assert r.headers["www-authenticate"] == "Bearer"
        for path in ("/v1/models", "/docs", "/redoc", "/openapi.json", "/metrics"):
            assert client.get(path).status_code == 401, path
        ok = client.get("/openapi.json", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


def _asgi(app, method: str, path: str, headers: dict, chunks: list[bytes]):
    """Drive the ASGI app directly; returns (status, headers, messages read from receive)."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("test", 80), "client": ("test", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    read, sent = [], []

    async def receive():
        if len(read) < len(chunks):
            read.append(chunks[len(read)])
            return {"type": "http.request", "body": read[-1],
                    "more_body": len(read) < len(chunks)}
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), read


def test_api_key_is_checked_before_the_body_is_read():
    app = create_app(ServerSettings(api_key="sekret"), StartingEngine(ServerSettings()))
    status, _, read = _asgi(app, "POST", "/v1/compress",
                            {"content-type": "application/json"}, [b"x" * 1000] * 50)
    assert status == 401 and read == []


def test_oversized_bodies_get_413_before_parsing():
    app = create_app(ServerSettings(max_body_bytes=1000), StartingEngine(ServerSettings()))
    # announced too large: dropped unparsed, so the client reads the 413 and may reuse
    # the connection; announced far too large: not read at all, and the connection closes
    status, headers, read = _asgi(app, "POST", "/v1/compress",
                                  {"content-length": "5000000"}, [b"x" * 5_000_000])
    assert status == 413 and len(read) == 1 and b"connection" not in headers
    status, headers, read = _asgi(app, "POST", "/v1/compress",
                                  {"content-length": str(10**10)}, [b"x"])
    assert status == 413 and read == [] and headers[b"connection"] == b"close"
    # no length announced (chunked): counted while read, refused once past the limit
    status, headers, read = _asgi(app, "POST", "/v1/compress", {}, [b"{" * 600] * 10)
    assert status == 413 and len(read) == 10 and b"connection" not in headers


def test_unhandled_errors_are_complete_responses_and_engine_death_is_503():
    from vllm.v1.engine.exceptions import EngineDeadError

    app = create_app(ServerSettings(), StartingEngine(ServerSettings()))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("bug")

    @app.get("/dead-in-group")
    async def dead_in_group():
        raise ExceptionGroup("tasks", [ValueError("x"), EngineDeadError()])

    @app.get("/busy")
    async def busy():
        with app.state.engine.admission(10**9):
            pass

    with TestClient(app) as client:
        r = client.get("/boom")
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
        r = client.get("/dead-in-group")
        assert r.status_code == 503 and "engine is dead" in r.json()["error"]
        r = client.get("/busy")
        assert r.status_code == 429 and r.headers["retry-after"]


class DeadEngine(StartingEngine):
    @property
    def dead(self) -> bool:
        return True


def test_dead_engine_is_reported_by_health_and_every_route():
    with make_client(DeadEngine) as client:
        assert client.get("/health").json()["status"] == "dead"
        r = client.post("/v1/compress", json={"problems": [{"text": "1+1?"}]})
        assert r.status_code == 503 and "engine is dead" in r.json()["error"]


@pytest.mark.parametrize("template", ["{x}", "{0}", "{", "}", "{problem}{problem:>3000000}",
                                      "{problem!r}", "{problem.__class__}", "no field",
                                      "{problem}" + "x" * 30_000])
def test_prompt_templates_with_anything_but_one_problem_field_are_422(template):
    with make_client() as client:
        r = client.post("/v1/compress", json={"problems": [{"text": "x"}],
                                              "prompt_template": template})
        assert r.status_code == 422
        assert r.json()["details"][0]["field"] == "prompt_template"


@pytest.mark.parametrize("variant,field", [
    ({"strategy": "adaptive", "threshold": "NaN"}, "variants.0.threshold"),
    ({"strategy": "adaptive", "threshold": "Infinity"}, "variants.0.threshold"),
    ({"strategy": "adaptive", "mass": "NaN"}, "variants.0.mass"),
])
def test_non_finite_variant_numbers_are_422_before_generation(variant, field):
    with make_client() as client:
        r = client.post("/v1/compress", json={"problems": [{"text": "x"}],
                                              "variants": [variant]})
        assert r.status_code == 422 and r.json()["details"][0]["field"] == field


def test_admission_refuses_past_the_limit_and_frees_on_exit():
    from server.engine.engine import EngineOverloaded

    engine = Engine(ServerSettings(max_pending_requests=4))
    with engine.admission(3):
        with pytest.raises(EngineOverloaded), engine.admission(2):
            pass
        assert engine.admitted == 3
    assert engine.admitted == 0


def test_a_cancelled_start_weight_update_never_takes_the_gate():
    from server.weightgate import HeldUpdate

    async def scenario() -> bool:
        gate, hold = WeightGate(), HeldUpdate()
        entered = asyncio.Event()

        async def generation():
            async with gate.generation():
                entered.set()
                await asyncio.sleep(0.2)

        running = asyncio.create_task(generation())
        await entered.wait()
        start = asyncio.create_task(hold.start(gate))  # waits for the generation
        await asyncio.sleep(0.05)
        start.cancel()
        await running
        async with asyncio.timeout(5):
            async with gate.generation():
                return hold.held

    assert asyncio.run(scenario()) is False


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

"""One error type, two bodies: routes `vllm serve` has answer vLLM's body and status codes
(what the openai SDK and TRL parse); stepzip's own routes keep field/reason details."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.engine import Engine
from server.settings import ServerSettings


class StartingEngine(Engine):
    """Never ready: request validation still runs, generation never does."""

    async def start(self) -> None:
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def client():
    settings = ServerSettings()
    with TestClient(create_app(settings, StartingEngine(settings))) as c:
        yield c


def test_openai_route_validation_is_400_with_vllms_body(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "n": "many"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 400 and error["param"] == "n" and "n" in error["message"]


def test_openai_route_not_ready_is_503_with_vllms_body(client):
    r = client.post("/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == 503


def test_stepzip_route_validation_is_422_with_details(client):
    r = client.post("/v1/compress", json={"problems": "not a list"})
    assert r.status_code == 422
    body = r.json()
    assert isinstance(body["error"], str)
    assert body["details"][0]["field"] == "problems"


def test_both_error_bodies_are_in_the_openapi_schema(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"VllmErrorBody", "ErrorBody"} <= set(schemas)
    completions = client.get("/openapi.json").json()["paths"]["/v1/completions"]["post"]
    assert {"400", "404", "503"} <= set(completions["responses"])


class HangingOpenAI:
    """A generation that never ends, so only the client's going away finishes it."""

    cancelled = False

    async def create_completion(self, req, raw_request):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            HangingOpenAI.cancelled = True
            raise


def test_client_disconnect_is_recorded_as_499_without_an_exception():
    settings = ServerSettings()
    engine = StartingEngine(settings)
    app = create_app(settings, engine)
    engine.ready, app.state.compressor, app.state.openai = True, object(), HangingOpenAI()
    body = b'{"prompt": "hi", "max_tokens": 4}'
    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "scheme": "http", "http_version": "1.1", "server": ("test", 80),
             "client": ("test", 1), "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():  # the body, then the client is gone
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # raised ValueError (HTTPStatus(499)) before
    assert HangingOpenAI.cancelled  # the engine work was abandoned
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    metrics = app.state.metrics.registry.get_sample_value(
        "stepzip_requests_total", {"route": "/v1/completions", "status": "499"})
    assert metrics == 1

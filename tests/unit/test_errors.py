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

"""/v1/compress refuses to prune without entropies (server/services/compress.py), over HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.engine import Engine, EntropyFetcher
from server.settings import ServerSettings


@pytest.fixture
def no_entropy_client(smollm2_tokenizer):
    class ReadyEngine(Engine):
        """Everything the route needs before generation, without vLLM's engine: a
        request that got as far as generating would fail, not hang."""

        async def start(self) -> None:
            self.tokenizer = smollm2_tokenizer
            self.fetcher = EntropyFetcher(llm=None)
            self.ready = True

    settings = ServerSettings(entropy=False, max_model_len=1024)
    with TestClient(create_app(settings, ReadyEngine(settings))) as client:
        yield client


def test_compress_without_entropy_is_refused_with_the_reason(no_entropy_client):
    r = no_entropy_client.post("/v1/compress", json={"problems": [{"text": "1+1?"}]})
    assert r.status_code == 409
    detail = r.json()["details"][0]
    assert detail["field"] == "server" and "--no-entropy" in detail["reason"]
    assert "--no-entropy" in r.json()["error"]

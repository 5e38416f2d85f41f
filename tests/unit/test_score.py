"""/v1/score and the viewer without an engine: the request schema, its mapping onto
/v1/compress, field-naming 4xx (non-UTF-8 bodies included) and the public viewer page
behind an API key."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.engine.engine import Engine
from server.settings import ServerSettings
from stepzip.schemas.compress import CompressRequest
from stepzip.schemas.score import Pair, ScoreRequest


class StartingEngine(Engine):
    async def start(self) -> None:
        await asyncio.Event().wait()


@pytest.fixture
def client():
    settings = ServerSettings(api_key="k")
    with TestClient(create_app(settings, StartingEngine(settings))) as c:
        c.headers["authorization"] = "Bearer k"
        yield c


def test_score_options_mirror_compress_options():
    """Every /v1/compress option but the generation ones applies to scoring too."""
    mirrored = set(CompressRequest.model_fields) - {"problems", "sampling"}
    assert set(ScoreRequest.model_fields) - {"pairs"} == mirrored


def test_to_compress_keeps_every_option_and_one_greedy_trace_per_pair():
    req = ScoreRequest(
        pairs=[Pair(problem="p1", reasoning="r1", answer="7", id="a"),
               Pair(problem="p2", reasoning_ids=[5, 6])],
        variants=[{"strategy": "high", "ratio": 0.3}], answer=True, answer_max_tokens=9,
        delimiter="\n", marker="<S>", merge_runs=True, prompt_template="Q: {problem}",
        system="sys", return_tokens=True, step_score="mean")
    out = req.to_compress()
    assert [(p.text, p.answer, p.id) for p in out.problems] == [("p1", "7", "a"),
                                                              ("p2", None, None)]
    assert out.sampling.n == 1 and out.sampling.temperature == 0.0
    for name in ScoreRequest.model_fields.keys() - {"pairs"}:
        assert getattr(out, name) == getattr(req, name), name


@pytest.mark.parametrize("pair,loc", [
    ({"problem": "p"}, ("pairs", 0)),
    ({"problem": "p", "reasoning": "r", "reasoning_ids": [1]}, ("pairs", 0)),
    ({"problem": "p", "reasoning": "  "}, ("pairs", 0, "reasoning")),
    ({"problem": " ", "reasoning": "r"}, ("pairs", 0, "problem")),
    ({"problem": "p", "reasoning_ids": []}, ("pairs", 0, "reasoning_ids")),
    ({"problem": "p", "reasoning_ids": [3, -1]}, ("pairs", 0, "reasoning_ids", 1)),
])
def test_bad_pairs_are_refused_naming_the_field(pair, loc):
    with pytest.raises(ValidationError) as err:
        ScoreRequest(pairs=[pair])
    assert err.value.errors()[0]["loc"] == loc


@pytest.mark.parametrize("template", ["no slot", "{problem} {other}", "{problem} {0}",
                                      "{problem} {"])
def test_prompt_template_must_format_with_problem_alone(template):
    with pytest.raises(ValidationError, match="prompt_template"):
        ScoreRequest(pairs=[{"problem": "p", "reasoning": "r"}], prompt_template=template)
    ScoreRequest(pairs=[{"problem": "p", "reasoning": "r"}], prompt_template="{problem} {{x}}")


@pytest.mark.parametrize("raw", [
    b'{"pairs": [{"problem": "1+1?", "reasoning": "two \xff\xfe"}]}',
    b'{"pairs": [{"problem": "1+1?", "reasoning": "two \\ud800"}]}',
])
def test_non_utf8_text_gets_422_naming_the_field_before_the_engine_is_up(client, raw):
    r = client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["details"][0]["field"] == "pairs.0.reasoning"


def test_valid_request_waits_for_the_engine(client):
    r = client.post("/v1/score", json={"pairs": [{"problem": "1+1?", "reasoning": "2"}]})
    assert r.status_code == 503


def test_viewer_page_is_public_and_the_api_is_not(client):
    anonymous = {"authorization": ""}
    for path, media in (("/viewer/", "text/html"), ("/viewer/viewer.js", "text/javascript"),
                        ("/viewer/viewer.css", "text/css")):
        r = client.get(path, headers=anonymous)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
    assert client.get("/viewer", headers=anonymous, follow_redirects=False).status_code == 307
    assert client.get("/v1/problems", headers=anonymous).status_code == 401
    assert client.get("/viewer/../v1/problems", headers=anonymous).status_code in (401, 404)
    page = client.get("/viewer/", headers=anonymous).text
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_example_problems(client):
    r = client.get("/v1/problems", params={"dataset": "svamp", "limit": 3, "offset": 2})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [p["id"] for p in data] == ["svamp-test-2", "svamp-test-3", "svamp-test-4"]
    assert all(p["text"] for p in data)
    for params, field in (({"dataset": "/etc/passwd"}, "query.dataset"),
                          ({"dataset": "svamp", "split": "train"}, "query.split"),
                          ({"limit": 0}, "query.limit")):
        r = client.get("/v1/problems", params=params)
        assert r.status_code == 422 and r.json()["details"][0]["field"] == field


def test_load_traces_reads_problem_reasoning_answer_and_id(tmp_path):
    from stepzip.data import load_traces

    path = tmp_path / "traces.jsonl"
    path.write_text('{"id": "a", "problem": "1+1?", "reasoning": "1+1 = 2", "answer": "2"}\n'
                    '\n{"question": "2+2?", "reasoning": "4"}\n')
    traces = load_traces(path)
    assert [(t.problem.id, t.problem.question, t.problem.answer, t.reasoning)
            for t in traces] == [("a", "1+1?", "2", "1+1 = 2"), ("traces-1", "2+2?", None, "4")]
    path.write_text('{"problem": "1+1?", "reasoning": ""}\n')
    with pytest.raises(ValueError, match="reasoning"):
        load_traces(path)
    path.write_text('{"problem": "1+1?"}\n')
    with pytest.raises(ValueError, match="reasoning"):
        load_traces(path)

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


def test_sampled_step_scores_are_refused_where_the_server_teacher_forces():
    """Forcing raises the given token's logit to 1e30 before vLLM takes logprobs: every
    'sampled' score would be 0. Such a server refuses it, naming the field, before any
    engine work."""
    from types import SimpleNamespace

    from server.errors import ApiError
    from server.services.score import Scorer

    req = ScoreRequest(pairs=[Pair(problem="p", reasoning_ids=[5, 6])], step_score="sampled")
    engine = SimpleNamespace(settings=SimpleNamespace(max_problems=8), max_model_len=64,
                             scoring="forcing", scoring_reason="Model Runner V2 is in use")
    with pytest.raises(ApiError) as err:
        Scorer(SimpleNamespace(engine=engine)).prepare(req, req.to_compress())
    assert err.value.status == 422 and err.value.details[0]["field"] == "step_score"
    assert "Model Runner V2" in err.value.details[0]["reason"]


# ---- `stepzip score`: bulk scoring, resumable ------------------------------------------


class FakeScoreClient:
    """Answers /v1/score requests like a server (one trace per pair, 3 tokens each);
    raises KeyboardInterrupt (a kill) on request number `die_at`."""

    def __init__(self, die_at: int | None = None):
        self.die_at, self.requests, self.scored = die_at, 0, []

    def score_request(self, request):
        from types import SimpleNamespace

        self.requests += 1
        if self.requests == self.die_at:
            raise KeyboardInterrupt
        self.scored += [p.id for p in request.pairs]
        results = [{"id": p.id, "prompt": f"Q: {p.problem}\n", "gold": p.answer, "traces": [{
            "sample": 0, "correct": None, "tokens": {"ids": [1, 2, 3]},
            "variants": [{"compressed_text": f"{p.id} kept\n[SKIP]", "n_steps": 2,
                          "n_skipped": 1, "tokens_before": 6, "tokens_after": 3,
                          "reduction": 0.5, "ratio": 0.8, "strategy": "low",
                          "correct": None, "extracted_answer": None,
                          "answer_text": None, "answer_finish_reason": None}]}]}
            for p in request.pairs]
        body = {"delimiter": "\n", "results": results,
                "usage": {"completion_tokens": 3 * len(request.pairs)}}
        return SimpleNamespace(model_dump=lambda mode: body)


def test_bulk_score_killed_mid_run_and_rerun_scores_every_trace_once(tmp_path):
    import json

    from clients.score import ScoreConfig, run_score

    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(
        json.dumps({"problem": f"{i}+{i}?", "answer": str(2 * i),
                    **({"reasoning": f"{i} and {i}"} if i % 2 else
                       {"reasoning_ids": [5, i + 1]})}) + "\n" for i in range(10)))
    cfg = ScoreConfig(input=str(traces), output=str(tmp_path / "out"), batch_size=2,
                      concurrency=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_score(cfg, FakeScoreClient(die_at=3), log=lambda _m: None)
    scored = tmp_path / "out" / "scored.jsonl"
    assert len(scored.read_text().splitlines()) == 4  # two batches written before the kill
    with scored.open("a") as f:
        f.write('{"id": "traces-9", "tr')  # a kill in the middle of a write
    client = FakeScoreClient()
    summary = run_score(cfg, client, log=lambda _m: None)
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    ids = [f"traces-{i}" for i in range(1, 11)]
    assert sorted(r["id"] for r in rows) == sorted(ids)  # each exactly once
    assert sorted(client.scored) == sorted(ids[4:])  # the rerun asked only for the rest
    assert summary["scored_now"] == 6 and summary["tokens_now"] == 18
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in sft) == sorted(ids)
    assert sft[0]["completion"].endswith(f"The answer is {sft[0]['gold']}.")
    with pytest.raises(SystemExit, match="ratio"):
        run_score(ScoreConfig(**{**cfg.__dict__, "ratio": 0.5}), FakeScoreClient(),
                  log=lambda _m: None)

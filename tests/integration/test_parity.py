"""Drop-in parity with `vllm serve`: the same requests to stepzip and to vLLM's own OpenAI
server on the same model folder and flags (`vllm_server` in conftest.py) get the same
status codes, the same JSON keys at every level and, where the output is determined
(greedy, or seeded: stepzip seeds sample k with seed + k, as vLLM does), the same values:
token ids and text exactly, logprobs within 1e-4.

Cases with the `stepzip` object (vLLM ignores the unknown field) check that stepzip's
keyed requests (one engine request per prompt, vLLM's own n children, an entropy key per
child) give vLLM's own `n > 1` tokens and logprobs for the same seed.

Deliberate differences, and why:
- `/v1/models` cards carry `weight_version` (stepzip reloads weights in place).
- Choices of a request with the `stepzip` object carry a `stepzip` object.
- Errors: status codes and the keys of the body are compared, not the wording or
  `param`: stepzip renders request-validation errors in its one error handler, and names
  the field (`param`) for out-of-vocabulary token-id prompts and lone surrogates, where
  vLLM's tokenizer reports only what it choked on.
- `logit_bias` with NaN/Infinity values: vLLM accepts them (and with a NaN bias samples
  from NaN logits); stepzip answers 400 naming `logit_bias`.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

pytestmark = pytest.mark.engine

LOGPROB_TOLERANCE = 1e-4
VOLATILE = {".id", ".created", ".system_fingerprint", ".error.message"}  # paths
P = "The capital of France is"
Q = "Two plus two equals"
CHAT = [{"role": "user", "content": "Say hello."}]


def cmp(body, max_tokens=6):
    return {"model": "smollm2", "prompt": P, "max_tokens": max_tokens, **body}


def chat(body, max_tokens=6):
    return {"model": "smollm2", "messages": CHAT, "max_tokens": max_tokens, **body}


G = {"temperature": 0}
SEEDED = {"temperature": 0.7, "top_p": 0.9, "seed": 11}
SZ = {"stepzip": {"entropies": True, "steps": True}}  # keyed children

# (name, method, path, body, exact): exact = the values must agree, not only the keys.
CASES = [
    # ---- /v1/completions ----
    ("greedy", "POST", "/v1/completions", cmp(G), True),
    ("greedy logprobs 3", "POST", "/v1/completions", cmp({**G, "logprobs": 3}), True),
    ("TRL style ids", "POST", "/v1/completions", cmp({**G, "logprobs": 0,
     "return_token_ids": True, "return_tokens_as_token_ids": True}), True),
    ("two text prompts", "POST", "/v1/completions", cmp({**G, "prompt": [P, Q]}), True),
    ("token-id prompt", "POST", "/v1/completions", cmp({**G, "prompt": [504, 3575, 282]}),
     True),
    ("token-id prompts", "POST", "/v1/completions", cmp({
        **G, "prompt": [[504, 3575], [7465, 2]], "return_token_ids": True}), True),
    ("n=14 seeded", "POST", "/v1/completions", cmp({
        "n": 14, "temperature": 1.0, "seed": 7, "return_token_ids": True}), True),
    ("n=14 T=0.7 top-p 0.9 processed logprobs", "POST", "/v1/completions", cmp({
        **SEEDED, "n": 14, "logprobs": 0, "return_token_ids": True}), True),
    ("n=14 unseeded", "POST", "/v1/completions", cmp({"n": 14, "temperature": 1.0}), False),
    ("stepzip n=14 seeded", "POST", "/v1/completions", cmp({
        **SZ, "n": 14, "temperature": 1.0, "seed": 7, "logprobs": 2,
        "return_token_ids": True}, 16), True),
    # T = 1 and greedy rollouts with entropies: the processed logprobs come from the
    # entropy pass's log-normaliser (server/engine/logprobs_reuse.py)
    ("stepzip greedy logprobs 3", "POST", "/v1/completions", cmp({**SZ, **G, "logprobs": 3}),
     True),
    ("stepzip n=4 T=0.7 top-p two prompts", "POST", "/v1/completions", cmp({
        **SZ, **SEEDED, "n": 4, "prompt": [P, Q], "logprobs": 0, "return_token_ids": True},
        16), True),
    ("stepzip n=1 seeded top-k", "POST", "/v1/completions", cmp({
        **SZ, "seed": 3, "top_k": 5, "logprobs": 1}), True),
    ("stepzip n=3 seeded penalties", "POST", "/v1/completions", cmp({
        **SZ, "n": 3, "temperature": 0.8, "seed": 5, "presence_penalty": 0.5,
        "repetition_penalty": 1.2, "logprobs": 1}, 12), True),
    ("n=1 seeded top-k", "POST", "/v1/completions", cmp({"seed": 3, "top_k": 5,
                                                         "logprobs": 1}), True),
    ("prompt_logprobs", "POST", "/v1/completions", cmp({**G, "prompt_logprobs": 2}), True),
    ("echo", "POST", "/v1/completions", cmp({**G, "echo": True, "logprobs": 1}), True),
    ("stop string", "POST", "/v1/completions", cmp({**G, "stop": [" Paris", "\n"]}, 16),
     True),
    ("stop token ids", "POST", "/v1/completions", cmp({
        **G, "stop_token_ids": [7042], "include_stop_str_in_output": True}, 12), True),
    ("logit_bias", "POST", "/v1/completions", cmp({**G, "logit_bias": {"30": 100}}), True),
    ("structured regex", "POST", "/v1/completions", cmp({
        **G, "structured_outputs": {"regex": "[0-9]{3}"}}), True),
    ("structured choice", "POST", "/v1/completions", cmp({
        **G, "structured_outputs": {"choice": ["yes", "no"]}}), True),
    ("penalties", "POST", "/v1/completions", cmp({
        **G, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.3}, 10), True),
    ("min_tokens ignore_eos", "POST", "/v1/completions", cmp({
        **G, "min_tokens": 4, "ignore_eos": True}), True),
    ("vLLM extras", "POST", "/v1/completions", cmp({
        **G, "priority": 0, "request_id": "parity-1", "cache_salt": "s",
        "truncate_prompt_tokens": 3, "user": "u", "unknown_field": 1}), True),
    ("logprobs 20", "POST", "/v1/completions", cmp({**G, "logprobs": 20}, 2), True),
    # ---- errors ----
    ("logprobs 21", "POST", "/v1/completions", cmp({"logprobs": 21}), True),
    ("temperature -1", "POST", "/v1/completions", cmp({"temperature": -1}), True),
    ("over model length", "POST", "/v1/completions", cmp({}, 5000), True),
    ("unknown model", "POST", "/v1/completions", cmp({"model": "nope"}), True),
    ("empty prompt list", "POST", "/v1/completions", cmp({"prompt": []}), True),
    ("min_tokens > max_tokens", "POST", "/v1/completions", cmp({"min_tokens": 9}), True),
    ("logit_bias out of vocab", "POST", "/v1/completions", cmp({
        "logit_bias": {"999999": 1}}), True),
    ("token prompt out of vocab", "POST", "/v1/completions", cmp({"prompt": [999999]}),
     True),
    ("stop_token_ids out of vocab", "POST", "/v1/completions", cmp({
        "stop_token_ids": [999999]}), True),
    ("n=0", "POST", "/v1/completions", cmp({"n": 0}), True),
    ("top_p 0", "POST", "/v1/completions", cmp({"top_p": 0}), True),
    ("prompt wrong type", "POST", "/v1/completions", cmp({"prompt": {"a": 1}}), True),
    ("lone surrogate", "POST", "/v1/completions", cmp({"prompt": "a\ud800b"}), True),
    # ---- /v1/chat/completions ----
    ("chat greedy", "POST", "/v1/chat/completions", chat(G), True),
    ("chat logprobs", "POST", "/v1/chat/completions", chat({
        **G, "logprobs": True, "top_logprobs": 2}), True),
    ("chat n=3 seeded", "POST", "/v1/chat/completions", chat({
        **SEEDED, "n": 3, "logprobs": True}), True),
    ("stepzip chat n=3 seeded", "POST", "/v1/chat/completions", chat({
        **SZ, **SEEDED, "n": 3, "logprobs": True, "top_logprobs": 2}, 12), True),
    ("chat token ids", "POST", "/v1/chat/completions", chat({
        **G, "return_token_ids": True}), True),
    ("chat max_completion_tokens", "POST", "/v1/chat/completions", chat({
        **G, "max_completion_tokens": 3}), True),
    ("chat json schema", "POST", "/v1/chat/completions", chat({**G, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}},
            "required": ["a"]}}}}, 12), True),
    ("chat continue final", "POST", "/v1/chat/completions", chat({
        **G, "messages": [*CHAT, {"role": "assistant", "content": "Hello"}],
        "add_generation_prompt": False, "continue_final_message": True}), True),
    ("chat request template refused", "POST", "/v1/chat/completions", chat({
        **G, "chat_template": "{{ messages[0].content }}"}), True),
    ("chat unknown role", "POST", "/v1/chat/completions", chat({
        **G, "messages": [{"role": "robot", "content": "x"}]}), True),
    ("chat no messages", "POST", "/v1/chat/completions", chat({"messages": []}), True),
    # ---- other routes ----
    ("tokenize", "POST", "/tokenize", {"model": "smollm2", "prompt": P}, True),
    ("tokenize chat", "POST", "/tokenize", {"model": "smollm2", "messages": CHAT}, True),
    ("detokenize", "POST", "/detokenize", {"model": "smollm2", "tokens": [504, 3575]},
     True),
    ("detokenize out of vocab", "POST", "/detokenize", {"model": "smollm2",
                                                        "tokens": [999999]}, True),
    ("models", "GET", "/v1/models", None, False),
    ("version", "GET", "/version", None, True),
]

STREAM_CASES = [
    ("stream greedy logprobs ids usage", "/v1/completions", cmp({
        **G, "logprobs": 1, "return_token_ids": True,
        "stream_options": {"include_usage": True}}, 8)),
    ("stream n=2 seeded", "/v1/completions", cmp({
        **SEEDED, "n": 2, "logprobs": 0, "return_token_ids": True}, 8)),
    ("stream chat logprobs usage", "/v1/chat/completions", chat({
        **G, "logprobs": True, "top_logprobs": 1,
        "stream_options": {"include_usage": True}}, 8)),
    ("stream chat n=2 seeded", "/v1/chat/completions", chat({**SEEDED, "n": 2}, 8)),
    ("stream stepzip n=3 seeded", "/v1/completions", cmp({
        **SZ, **SEEDED, "n": 3, "logprobs": 0, "return_token_ids": True}, 8)),
    ("stream stepzip chat n=2 seeded", "/v1/chat/completions", chat({
        **SZ, **SEEDED, "n": 2, "logprobs": True}, 8)),
]


def shape(value, key: str = ""):
    """Keys at every level and value types, not the values. Completions' `top_logprobs`
    maps token text to logprob, so its keys are data."""
    if isinstance(value, dict):
        if key == "top_logprobs":
            return "token->logprob"
        return {k: shape(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return ["list", shape(value[0], key)] if value else ["empty list"]
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else type(value).__name__


def differences(ours, theirs, path: str = "") -> list[str]:
    """Where two JSON values differ: exact, except logprobs (within the tolerance) and
    the paths in VOLATILE (ids, timestamps, error wording)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for k in sorted(set(ours) | set(theirs)):
            if f"{path}.{k}" not in VOLATILE:
                out += differences(ours.get(k), theirs.get(k), f"{path}.{k}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return [f"{path}: {len(ours)} vs {len(theirs)} items"]
        return [d for i, (a, b) in enumerate(zip(ours, theirs))
                for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(ours, float) and isinstance(theirs, (int, float)) and "logprob" in path:
        ok = math.isclose(ours, theirs, rel_tol=0, abs_tol=LOGPROB_TOLERANCE)
        return [] if ok else [f"{path}: {ours} vs {theirs}"]
    return [] if ours == theirs else [f"{path}: {ours!r} vs {theirs!r}"]


def without_deliberate(name: str, request, body):
    if name == "models":
        for card in body["data"]:
            card.pop("weight_version", None)
    if request and "stepzip" in request:
        for choice in body["choices"]:
            assert isinstance(choice.pop("stepzip"), dict), choice  # one per choice
    return body


def ask(url: str, method: str, path: str, body) -> tuple[int, object]:
    r = httpx.request(method, url + path, timeout=300,
                      content=None if body is None else json.dumps(body),
                      headers={"content-type": "application/json"})
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


@pytest.fixture(scope="module")
def pairs(server, vllm_server):
    """Every case sent to both servers, in the same order."""
    return {name: (ask(server.url, method, path, body), ask(vllm_server.url, method, path,
                                                            body))
            for name, method, path, body, _ in CASES}


@pytest.mark.parametrize("name,method,path,body,exact", CASES, ids=[c[0] for c in CASES])
def test_same_answer_as_vllm_serve(pairs, name, method, path, body, exact):
    (status, ours), (their_status, theirs) = pairs[name]
    assert status == their_status, (ours, theirs)
    if body and "stepzip" in body:
        assert status == 200, ours  # the samples ran, so there is something to compare
    if status >= 400:
        assert set(ours) == set(theirs) == {"error"}
        assert set(ours["error"]) == set(theirs["error"]) == {"message", "type", "param",
                                                             "code"}
        assert ours["error"]["code"] == status
        return
    ours = without_deliberate(name, body, ours)
    assert shape(ours) == shape(theirs)
    if exact:
        assert differences(ours, theirs) == []


def sse_events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def merged_stream(events: list[dict], stepzip: bool = False) -> dict:
    """Per choice: the concatenation of every delta field (text, token ids, logprobs), the
    finish reason, and the set of keys chunks carried; plus the usage chunk. `stepzip`:
    each choice's finishing chunk carries the `stepzip` object (taken out)."""
    choices: dict[int, dict] = {}
    usage = None
    for event in events:
        usage = event.get("usage") or usage
        for c in event["choices"]:
            if stepzip and c.get("finish_reason") is not None:
                assert isinstance(c.pop("stepzip"), dict), c
            acc = choices.setdefault(c["index"], {"text": "", "token_ids": [], "logprobs": [],
                                                  "keys": set()})
            acc["keys"] |= set(c)
            delta = c.get("delta", {})
            acc["text"] += c.get("text") or delta.get("content") or ""
            acc["token_ids"] += c.get("token_ids") or []
            lp = c.get("logprobs") or {}
            acc["logprobs"] += lp.get("token_logprobs") or [x["logprob"] for x in
                                                            lp.get("content") or []]
            acc["finish_reason"] = c.get("finish_reason") or acc.get("finish_reason")
    for acc in choices.values():
        acc["keys"] = sorted(acc["keys"])
    return {"choices": choices, "usage": usage}


@pytest.mark.parametrize("name,path,body", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_same_stream_as_vllm_serve(server, vllm_server, name, path, body):
    ours = sse_events(server.url, path, body)
    theirs = sse_events(vllm_server.url, path, body)
    assert {tuple(sorted(e)) for e in ours} == {tuple(sorted(e)) for e in theirs}
    a, b = merged_stream(ours, stepzip="stepzip" in body), merged_stream(theirs)
    assert differences(a, b) == []
    if body.get("logprobs"):  # logprobs arrive with every chunk's tokens, as in vLLM
        for acc in a["choices"].values():
            assert len(acc["logprobs"]) == len(acc["token_ids"] or acc["logprobs"]) > 0


def test_deliberate_difference_non_finite_logit_bias(server, vllm_server):
    """vLLM accepts NaN/Infinity biases (and samples from the NaN logits); stepzip refuses
    them, since they would also poison the entropies."""
    for value in ("NaN", "Infinity"):
        body = ('{"model": "smollm2", "prompt": "hi", "max_tokens": 2, '
                f'"logit_bias": {{"30": {value}}}}}')
        ours = ask(server.url, "POST", "/v1/completions", json.loads(body))
        theirs = ask(vllm_server.url, "POST", "/v1/completions", json.loads(body))
        assert ours[0] == 400 and ours[1]["error"]["param"] == "logit_bias"
        assert theirs[0] == 200

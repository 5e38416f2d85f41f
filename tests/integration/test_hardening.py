"""Hostile input and load on the shared server: nothing is lost, nothing is a 5xx, every
refusal names its field, and /health stays 200 throughout."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

VOCAB = 49_152
SMALL = {"max_tokens": 4, "temperature": 0}


def _compress(**kw) -> dict:
    body = {"problems": [{"text": "What is 2 + 3?", "answer": "5"}],
            "sampling": {"max_tokens": 8}, "answer_max_tokens": 4,
            "variants": [{"strategy": "low", "ratio": 0.5}]}
    body.update(kw)
    return body


# (method, path, body or raw bytes, expected field or None for a valid request)
VALID = [
    ("POST", "/v1/compress", _compress(), None),
    ("POST", "/v1/compress", _compress(sampling={"max_tokens": 8, "n": 2}, answer=False), None),
    ("POST", "/v1/completions", {"prompt": "Once upon a time", **SMALL}, None),
    ("POST", "/v1/completions", {"prompt": [[1, 2, 3]], "n": 2, "max_tokens": 4,
                                 "temperature": 0.7}, None),
    ("POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], **SMALL}, None),
    ("GET", "/health", None, None),
    ("GET", "/v1/models", None, None),
    ("GET", "/metrics", None, None),
]

INVALID = [
    # /v1/compress
    ("POST", "/v1/compress", _compress(prompt_template="{x}"), "prompt_template"),
    ("POST", "/v1/compress", _compress(prompt_template="{0}"), "prompt_template"),
    ("POST", "/v1/compress", _compress(prompt_template="{"), "prompt_template"),
    ("POST", "/v1/compress", _compress(prompt_template="{problem}{problem:>3000000}"),
     "prompt_template"),
    ("POST", "/v1/compress", _compress(variants=[{"strategy": "adaptive", "threshold": "NaN"}]),
     "variants.0.threshold"),
    ("POST", "/v1/compress", _compress(answer_max_tokens=1000), "answer_max_tokens"),
    ("POST", "/v1/compress", _compress(problems=[{"text": "bad \ud800 surrogate"}]),
     "problems.0.text"),
    ("POST", "/v1/compress", _compress(sampling={"max_tokens": 5000}), "sampling.max_tokens"),
    ("POST", "/v1/compress", _compress(sampling={"max_tokens": 1000}), "problems.0.text"),
    ("POST", "/v1/compress", _compress(sampling={"max_tokens": 4, "n": 1000}), "sampling.n"),
    ("POST", "/v1/compress", _compress(problems=[{"text": "x"}] * 9), "problems"),
    ("POST", "/v1/compress", _compress(sampling={"max_tokens": 4, "top_p": 0}), "sampling.top_p"),
    ("POST", "/v1/compress", b"{not json", "body"),
    ("POST", "/v1/compress", b"x" * (9 * 2**20), "body"),  # over --max-body-bytes (8 MiB)
    # OpenAI routes (vLLM's body: the field is `param`)
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5},
     "min_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {str(VOCAB + 5): 1}, **SMALL},
     "logit_bias"),
    ("POST", "/v1/completions", {"prompt": [[VOCAB + 7]], **SMALL}, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop_token_ids": [VOCAB + 9], **SMALL},
     "stop_token_ids"),
    ("POST", "/v1/completions", {"prompt": "bad \ud800", **SMALL}, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "chat_template": "{% for x in y %}{% endfor %}", **SMALL},
     "chat_template"),
    ("POST", "/v1/completions", {"prompt": "hi", "vllm_xargs": {"stepzip_forced_ids": [7]},
                                 **SMALL}, "vllm_xargs.stepzip_forced_ids"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "vllm_xargs": {"stepzip_entropy_key": "k"}, **SMALL},
     "vllm_xargs.stepzip_entropy_key"),
    # weight routes
    ("POST", "/v1/weights/load", {"path": "x" * 5000}, "path"),
    ("POST", "/v1/weights/load", {"path": "/tmp/a\x00b"}, "path"),
    ("POST", "/v1/weights/load", {"path": "/etc"}, "path"),
]


def _field_named(response: httpx.Response, field: str) -> bool:
    body = response.json()
    error = body.get("error")
    if isinstance(error, dict):  # vLLM's body
        return field in (error.get("param") or "") or field in error.get("message", "")
    return any(field in d["field"] for d in body.get("details", []))


async def _send(http: httpx.AsyncClient, method: str, path: str, body):
    if isinstance(body, bytes):
        return await http.request(method, path, content=body,
                                  headers={"content-type": "application/json"})
    if body is None:
        return await http.request(method, path)
    # ensure_ascii keeps lone surrogates as \ud800 escapes, as a hostile client sends them
    return await http.request(method, path, content=json.dumps(body).encode(),
                              headers={"content-type": "application/json"})


def test_soak_mixed_valid_and_hostile_requests(server):
    rng = random.Random(0)
    plan = [rng.choice(VALID) for _ in range(180)] + INVALID * 6
    rng.shuffle(plan)
    assert len(plan) >= 300

    async def run():
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http:
            health, stop = [], asyncio.Event()

            async def watch_health():
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as probe:
                    while not stop.is_set():
                        health.append((await probe.get("/health")).status_code)
                        await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch_health())
            gate = asyncio.Semaphore(32)

            async def one(item):
                async with gate:
                    try:
                        return item, await _send(http, *item[:3])
                    except httpx.TransportError as exc:
                        return item, exc

            results = await asyncio.gather(*(one(item) for item in plan))
            stop.set()
            await watcher
            return results, health

    started = time.perf_counter()
    results, health = asyncio.run(run())
    lost = [(i[1], repr(r)) for i, r in results if isinstance(r, Exception)]
    errors = [(i[1], i[3], r.status_code, r.text[:200]) for i, r in results
              if not isinstance(r, Exception) and r.status_code >= 500]
    valid_failed = [(i[1], r.status_code, r.text[:200]) for i, r in results
                    if not isinstance(r, Exception) and i[3] is None and r.status_code != 200]
    unnamed = [(i[1], i[3], r.status_code, r.text[:200]) for i, r in results
               if not isinstance(r, Exception) and i[3] is not None
               and not (400 <= r.status_code < 500 and _field_named(r, i[3]))]
    print(f"{len(results)} requests in {time.perf_counter() - started:.1f} s; "
          f"{len(health)} health probes")
    assert not lost, lost[:5]
    assert not errors, errors[:5]
    assert not valid_failed, valid_failed[:5]
    assert not unnamed, {(path, field): text for path, field, _, text in unnamed}
    assert health and set(health) == {200}
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    # the worker's store has 2 x 64 + 64 entries for at most 64 running requests: every
    # finished request's entropies were fetched before any had to be evicted
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert "\nstepzip_entropy_evictions_total 0.0\n" in metrics


def test_failed_transfer_call_leaves_generation_unblocked(server):
    """On the CPU /start_weight_update fails (no transfer engine); it used to keep the
    weight gate held for its 600 s timeout while /health said ok."""
    r = httpx.post(server.url + "/start_weight_update", timeout=60)
    assert r.status_code == 409, r.text
    r = httpx.post(server.url + "/update_weights", json={"update_info": {}}, timeout=60)
    assert r.status_code == 409, r.text  # no update in progress
    started = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", **SMALL}, timeout=120)
    assert r.status_code == 200, r.text
    print(f"next completion served in {time.perf_counter() - started:.2f} s")


def test_event_loop_answers_health_while_maximal_prompts_are_rejected(server):
    """8 requests of 8 problems of 100,000 characters (tokenized in a worker thread, then
    refused as longer than the model): /health keeps answering while they are pending."""
    text = ("Tom has three apples and buys four more. " * 2500)[:100_000]
    hostile = _compress(problems=[{"text": text}] * 8)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            pending = [asyncio.create_task(http.post("/v1/compress", json=hostile))
                       for _ in range(8)]
            probes = []
            while not all(t.done() for t in pending):
                t0 = time.perf_counter()
                r = await http.get("/health")
                probes.append((r.status_code, time.perf_counter() - t0,
                               sum(not t.done() for t in pending)))
            return [t.result() for t in pending], probes

    answers, probes = asyncio.run(run())
    assert all(r.status_code == 422 for r in answers), [r.text[:200] for r in answers]
    assert all(r.json()["details"][0]["field"] == "problems.0.text" for r in answers)
    during = [p for p in probes if p[2] > 0]
    print(f"{len(during)} /health answers while hostile requests were pending; slowest "
          f"{max(p[1] for p in probes):.3f} s")
    assert len(during) >= 3 and all(code == 200 for code, _, _ in probes)

"""OpenAI-shaped routes with real clients: TRL's VLLMClient (compared with vLLM's own
server on the same model, `vllm_server` in conftest.py) and the openai SDK, streaming
included; the stepzip extension; weight reloads under load."""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest

pytestmark = pytest.mark.engine

PROMPTS = ["The capital of France is", "Two plus two equals"]


def _structure(value):
    """Shape of a JSON-like value: types, keys and list lengths, not the numbers."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_structure(v) for v in value]
    return type(value).__name__


def test_trl_vllm_client_generate_matches_vllm_serve(server, vllm_server):
    from trl.generation.vllm_client import VLLMClient

    ours = VLLMClient(base_url=server.url, connection_timeout=60)
    theirs = VLLMClient(base_url=vllm_server.url, connection_timeout=60)
    # K=14 sampled rollouts per prompt: the same structure, prompt-major
    a = ours.generate(PROMPTS, n=14, max_tokens=8, temperature=1.0)
    b = theirs.generate(PROMPTS, n=14, max_tokens=8, temperature=1.0)
    assert set(a) == set(b)
    assert len(a["prompt_ids"]) == len(PROMPTS)
    assert len(a["completion_ids"]) == len(PROMPTS) * 14
    assert a["prompt_ids"] == b["prompt_ids"]
    assert _structure(a["logprobs"][0][0]) == _structure(b["logprobs"][0][0])

    # greedy (vLLM refuses n > 1 greedy), same float32 weights: the same tokens and logprobs
    a = ours.generate(PROMPTS, n=1, max_tokens=8, temperature=0.0)
    b = theirs.generate(PROMPTS, n=1, max_tokens=8, temperature=0.0)
    assert _structure(a) == _structure(b)
    assert a["completion_ids"] == b["completion_ids"]
    for x, y in zip(a["logprobs"], b["logprobs"]):
        assert all(math.isclose(u[0], v[0], abs_tol=1e-4) for u, v in zip(x, y, strict=True))

    # token-id prompts keep the shape
    sampled = ours.generate(a["prompt_ids"], n=14, max_tokens=6, temperature=1.0, top_k=20)
    assert len(sampled["completion_ids"]) == 28
    assert sampled["prompt_ids"] == a["prompt_ids"]


def test_trl_vllm_client_chat_matches_vllm_serve(server, vllm_server):
    from trl.generation.vllm_client import VLLMClient

    messages = [[{"role": "user", "content": "Say hello."}],
                [{"role": "user", "content": "Name a color."}]]
    a = VLLMClient(base_url=server.url).chat(messages, n=1, max_tokens=6, temperature=0.0)
    b = VLLMClient(base_url=vllm_server.url).chat(messages, n=1, max_tokens=6, temperature=0.0)
    assert _structure(a) == _structure(b)
    assert a["prompt_ids"] == b["prompt_ids"]
    assert a["completion_ids"] == b["completion_ids"]


def test_openai_sdk_completions_and_chat_with_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.completions.create(model="smollm2", prompt=PROMPTS, max_tokens=8,
                                    temperature=0.7, n=2, seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens > 0

    chat = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens

    streamed = "".join(
        chunk.choices[0].text for chunk in client.completions.create(
            model="smollm2", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
        if chunk.choices)
    plain = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=8,
                                      temperature=0)
    assert streamed == plain.choices[0].text

    pieces, usage = [], None
    for chunk in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
    assert "".join(pieces) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens


def test_stepzip_extension_rides_along(server):
    r = httpx.post(server.url + "/v1/completions", json={
        "prompt": PROMPTS, "n": 3, "max_tokens": 24, "temperature": 0.8, "seed": 5,
        "return_token_ids": True, "stepzip": {"entropies": True, "steps": True}}, timeout=300)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 6
    for c in choices:
        sz = c["stepzip"]
        assert len(sz["entropies"]) == len(c["token_ids"])
        assert sz["n_steps"] == len(sz["steps"])
        assert 0.0 <= sz["skip_ratio"] <= 1.0
    # the same seed gives the same samples, and the n samples differ from each other
    again = httpx.post(server.url + "/v1/completions", json={
        "prompt": PROMPTS, "n": 3, "max_tokens": 24, "temperature": 0.8, "seed": 5,
        "return_token_ids": True}, timeout=300).json()["choices"]
    assert [c["token_ids"] for c in again] == [c["token_ids"] for c in choices]
    assert len({tuple(c["token_ids"]) for c in choices[:3]}) > 1


def _fetch_rpcs(url: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^stepzip_entropy_fetch_seconds_count (\S+)$", metrics,
                           re.MULTILINE).group(1))


def test_children_finishing_together_cost_one_entropy_fetch(server):
    """n = 14 samples of one prompt finish in the same engine step (ignore_eos): their
    entropies come back in one engine RPC, not 14 between engine steps."""
    before = _fetch_rpcs(server.url)
    r = httpx.post(server.url + "/v1/completions", json={
        "prompt": PROMPTS[0], "n": 14, "max_tokens": 8, "ignore_eos": True, "seed": 1,
        "stepzip": {"entropies": True}}, timeout=300)
    assert r.status_code == 200, r.text
    assert all(len(c["stepzip"]["entropies"]) == 8 for c in r.json()["choices"])
    assert _fetch_rpcs(server.url) - before == 1


def test_openai_routes_answer_bad_input_as_vllm_does(server):
    """400 with vLLM's body naming the field, before anything is generated."""
    cases = [({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
             ({"prompt": "hi", "temperature": -1}, "temperature"),
             ({"prompt": "hi", "max_tokens": 4, "min_tokens": 9}, "min_tokens"),
             ({"prompt": "hi", "max_tokens": 4, "logit_bias": {"999999": 1.0}}, "logit_bias"),
             ({"prompt": "hi", "max_tokens": 4, "logit_bias": {"5": float("nan")}},
              "logit_bias"),
             ({"prompt": "hi", "max_tokens": 4, "stop_token_ids": [999999]},
              "stop_token_ids"),
             ({"prompt": [999999], "max_tokens": 4}, "prompt"),
             ({"prompt": "a\ud800b", "max_tokens": 4}, "prompt"),
             ({"prompt": "hi", "n": 65}, "n"),
             ({"prompt": "hi", "logprobs": 21}, "logprobs")]
    for body, field in cases:
        r = httpx.post(server.url + "/v1/completions", content=json.dumps(body),
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == 400 and field in error["message"], (field, error)
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"})
    assert r.status_code == 400  # templates are code: refused without the opt-in
    assert "chat template" in r.json()["error"]["message"].lower()
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


def test_openai_sdk_bad_request_names_the_field(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for kwargs, field in [({"temperature": -1}, "temperature"), ({"n": 65}, "n"),
                          ({"extra_body": {"stepzip": {"bogus": 1}}}, "stepzip")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="smollm2", prompt="hi", max_tokens=4, **kwargs)
        assert field in str(caught.value), str(caught.value)


def test_smuggled_internal_engine_keys_are_refused_naming_the_field(server):
    """`vllm_xargs` reaches `SamplingParams.extra_args`, where stepzip's processors read
    their keys: `stepzip_forced_ids` forced the emitted tokens before it was refused."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    plain = {"prompt": "hi", "max_tokens": 4}
    cases = [("/v1/completions", plain, "stepzip_forced_ids", [30, 31, 32, 33]),
             ("/v1/completions", {**plain, "stream": True}, "stepzip_forced_ids", [30]),
             ("/v1/completions", {**plain, "n": 2, "stepzip": {"entropies": True}},
              "stepzip_entropy_key", "sz-mine"),
             ("/v1/chat/completions", chat, "stepzip_forced_ids", [30, 31, 32, 33]),
             ("/v1/chat/completions", {**chat, "stream": True}, "stepzip_entropy_key", "k"),
             ("/v1/chat/completions", chat, "stepzip_future_key", 1)]
    for path, body, key, value in cases:
        r = httpx.post(server.url + path, timeout=60,
                       json={**body, "vllm_xargs": {"other": 1, key: value}})
        assert r.status_code == 400, (path, key, r.text)
        error = r.json()["error"]
        assert error["param"] == f"vllm_xargs.{key}" and error["code"] == 400, error
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={**plain, "vllm_xargs": {"other": 1}})
    assert r.status_code == 200, r.text  # extensions' own keys still pass


def test_trl_sequence_logprobs_structured_outputs_and_cache_reset(server, vllm_server):
    from trl.generation.vllm_client import VLLMClient

    ours, theirs = VLLMClient(base_url=server.url), VLLMClient(base_url=vllm_server.url)
    sequences = [[504, 3575, 282, 4649, 314], [7465, 2, 30, 31]]
    a = ours.get_sequence_logprobs(sequences, [2, 1], top_logprobs=5)
    b = theirs.get_sequence_logprobs(sequences, [2, 1], top_logprobs=5)
    assert a["logprob_token_ids"] == b["logprob_token_ids"]
    for x, y in zip(a["actual_logprobs"], b["actual_logprobs"], strict=True):
        assert all(math.isclose(u[0], v[0], abs_tol=1e-4) for u, v in zip(x, y, strict=True))

    a = ours.generate(PROMPTS, max_tokens=6, temperature=0.0, structured_outputs_regex="[0-9]{3}")
    b = theirs.generate(PROMPTS, max_tokens=6, temperature=0.0,
                        structured_outputs_regex="[0-9]{3}")
    assert a["completion_ids"] == b["completion_ids"]
    text = httpx.post(server.url + "/v1/completions", json={
        "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0,
        "structured_outputs": {"regex": "[0-9]{3}"}}, timeout=60).json()["choices"][0]["text"]
    assert re.fullmatch("[0-9]{3}", text)

    ours.reset_prefix_cache()  # vLLM's server has it only with VLLM_SERVER_DEV_MODE=1


def _greedy(server, prompt="Once upon a time") -> list[int]:
    r = httpx.post(server.url + "/v1/completions", json={
        "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True},
        timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_weight_reload_changes_output_and_comes_back(server, default_model_dir, weights_root):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    perturbed = weights_root / "perturbed"
    if not perturbed.exists():
        shutil.copytree(default_model_dir, perturbed)
        tensors = load_file(str(default_model_dir / "model.safetensors"))
        gen = torch.Generator().manual_seed(0)
        for name, t in tensors.items():
            if name.endswith("mlp.down_proj.weight"):
                tensors[name] = t + 0.05 * torch.randn(t.shape, generator=gen).to(t.dtype)
        save_file(tensors, str(perturbed / "model.safetensors"), metadata={"format": "pt"})

    before = _greedy(server)
    v0 = httpx.get(server.url + "/v1/models").json()["data"][0]["weight_version"]
    r = httpx.post(server.url + "/v1/weights/load", json={"path": str(perturbed)}, timeout=300)
    assert r.status_code == 200, r.text
    v1 = r.json()["version"]
    assert v1 != v0 and r.json()["checksum"]
    assert _greedy(server) != before
    try:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["weight_version"] == v1
    finally:
        r = httpx.post(server.url + "/v1/weights/load", json={"path": str(default_model_dir)},
                       timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["version"] not in (v0, v1)
    assert _greedy(server) == before

    outside = httpx.post(server.url + "/v1/weights/load", json={"path": "/etc"}, timeout=30)
    assert outside.status_code == 403
    assert outside.json()["details"][0]["field"] == "path"
    missing = httpx.post(server.url + "/v1/weights/load",
                         json={"path": str(weights_root / "nope")}, timeout=30)
    assert missing.status_code == 422


def test_generation_during_reload_waits_and_never_fails(server, default_model_dir):
    import asyncio

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            gens = [http.post("/v1/completions", json={
                "prompt": PROMPTS[i % 2], "max_tokens": 16, "temperature": 0})
                for i in range(12)]
            reload = http.post("/v1/weights/load", json={"path": str(default_model_dir)})
            return await asyncio.gather(*gens[:6], reload, *gens[6:])

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]


def test_trl_weight_sync_surface_answers(server):
    """The routes TRL's NCCL sync reads before it moves weights (the transfer itself needs
    CUDA and is not exercised on the CPU)."""
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=server.url)
    assert client.get_world_size() == 1
    info = client.get_server_info()
    # TRL's GRPO trainer warns unless the server reports TRL's own logprobs mode
    assert info["model_config"]["logprobs_mode"] == "processed_logprobs"
    assert info["parallel_config"]["data_parallel_size"] == 1
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=60).status_code == 200


def test_sse_stream_with_n_and_stepzip_matches_non_streaming(server):
    body = {"prompt": PROMPTS, "n": 2, "max_tokens": 10, "temperature": 0.8, "seed": 9,
            "logprobs": 0, "return_token_ids": True, "stepzip": {"entropies": True}}
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    texts: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    finals: dict[int, dict] = {}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line[len("data: "):])["choices"]:
            i = choice["index"]
            # deltas: each chunk carries its own tokens with their logprobs
            assert len(choice["logprobs"]["token_logprobs"]) == len(choice["token_ids"])
            texts[i] = texts.get(i, "") + choice["text"]
            ids[i] = ids.get(i, []) + choice["token_ids"]
            if choice.get("finish_reason"):
                finals[i] = choice
            else:
                assert "stepzip" not in choice
    assert sorted(texts) == [0, 1, 2, 3]
    for c in plain["choices"]:
        assert texts[c["index"]] == c["text"]
        assert ids[c["index"]] == c["token_ids"]
        streamed = finals[c["index"]]["stepzip"]["entropies"]
        assert all(math.isclose(a, b, abs_tol=1e-4)
                   for a, b in zip(streamed, c["stepzip"]["entropies"], strict=True))

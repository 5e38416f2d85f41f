"""OpenAI-shaped routes with real clients: TRL's VLLMClient (compared with vLLM's own
server on the same model) and the openai SDK, streaming included; the stepzip extension."""

from __future__ import annotations

import sys

import httpx
import pytest

from clients.launcher import ServerProcess

pytestmark = pytest.mark.engine

PROMPTS = ["The capital of France is", "Two plus two equals"]


@pytest.fixture(scope="module")
def vllm_server(default_model_dir):
    """vLLM's own OpenAI server on the same model and dtype, for structure comparison."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(default_model_dir), "--served-model-name", "smollm2",
               "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
               "--host", "127.0.0.1"]
    proc = ServerProcess(command=command, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=600)
    proc.command += ["--port", str(proc.port)]
    with proc:
        yield proc


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
        assert [round(v[0], 3) for v in x] == [round(v[0], 3) for v in y]

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


def test_openai_routes_reject_bad_input_with_422(server):
    cases = [({"prompt": "", "max_tokens": 4}, "prompt"),
             ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
             ({"prompt": "hi", "temperature": -1}, "temperature"),
             ({"prompt": "hi", "echo": True}, "echo"),
             ({"prompt": "hi", "bogus_field": 1}, "bogus_field"),
             ({"prompt": [[]], "max_tokens": 4}, "prompt"),
             ({"prompt": "hi", "max_tokens": 4, "logit_bias": {"x": 1.0}}, "logit_bias")]
    for body, field in cases:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 422, (body, r.text)
        text = r.text
        assert field in text or "body" in text, (field, text)
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404


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
    assert "logprobs_mode" in info["model_config"]
    assert info["parallel_config"]["data_parallel_size"] == 1
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=60).status_code == 200


def test_sse_stream_with_n_and_stepzip_matches_non_streaming(server):
    import json

    body = {"prompt": PROMPTS, "n": 2, "max_tokens": 10, "temperature": 0.8, "seed": 9,
            "return_token_ids": True, "stepzip": {"entropies": True}}
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    texts: dict[int, str] = {}
    finals: dict[int, dict] = {}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line[len("data: "):])["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice.get("finish_reason"):
                finals[choice["index"]] = choice
    assert sorted(texts) == [0, 1, 2, 3]
    for c in plain["choices"]:
        assert texts[c["index"]] == c["text"]
        final = finals[c["index"]]
        assert final["token_ids"] == c["token_ids"]
        assert len(final["stepzip"]["entropies"]) == len(c["token_ids"])

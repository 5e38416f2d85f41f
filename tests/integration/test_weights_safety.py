"""All-or-nothing weight loads on the shared server: every broken checkpoint is refused
with a 4xx naming `path`, and afterwards the server generates exactly what it did before
under the same weight version (a refused load used to leave layers on the meta device
and kill the engine at the next request)."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

DROPPED = "model.layers.0.mlp.down_proj.weight"


def _greedy(url: str) -> list[int]:
    r = httpx.post(url + "/v1/completions", json={
        "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
        "return_token_ids": True}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _version(url: str) -> str:
    return httpx.get(url + "/health", timeout=30).json()["weight_version"]


@pytest.fixture(scope="module")
def broken_checkpoints(default_model_dir, weights_root, tmp_path_factory):
    """name -> folder; the big file (all tensors but one) is written once and linked."""
    original = default_model_dir / "model.safetensors"
    tensors = load_file(str(original))
    dropped = tensors.pop(DROPPED)  # [576, 1536]
    base = weights_root / "safety-base"
    base.mkdir(exist_ok=True)
    save_file(tensors, str(base / "all-but-one.safetensors"), metadata={"format": "pt"})
    del tensors

    def folder(name: str) -> object:
        path = weights_root / f"broken-{name}"
        path.mkdir(exist_ok=True)
        return path

    made = {}
    made["missing tensor"] = folder("missing")
    (made["missing tensor"] / "model.safetensors").symlink_to(base / "all-but-one.safetensors")

    made["wrong shape"] = folder("shape")
    (made["wrong shape"] / "a.safetensors").symlink_to(base / "all-but-one.safetensors")
    save_file({DROPPED: dropped.t().contiguous()}, str(made["wrong shape"] / "b.safetensors"))

    made["extra tensor"] = folder("extra")
    (made["extra tensor"] / "a.safetensors").symlink_to(original)
    save_file({"model.layers.0.mlp.surplus.weight": torch.zeros(4, 4)},
              str(made["extra tensor"] / "b.safetensors"))

    made["truncated"] = folder("truncated")
    with open(original, "rb") as src:
        (made["truncated"] / "model.safetensors").write_bytes(src.read(20 * 2**20))

    made["foreign"] = folder("foreign")
    (made["foreign"] / "model.safetensors").write_text("{\"not\": \"a checkpoint\"}\n" * 100)

    outside = tmp_path_factory.mktemp("outside-root")
    save_file({DROPPED: dropped}, str(outside / "model.safetensors"))
    made["symlinked file out of the root"] = folder("escape")
    (made["symlinked file out of the root"] / "model.safetensors").symlink_to(
        outside / "model.safetensors")
    return made


def test_broken_checkpoints_are_refused_and_nothing_changes(server, broken_checkpoints):
    before, version = _greedy(server.url), _version(server.url)
    for case, folder in broken_checkpoints.items():
        r = httpx.post(server.url + "/v1/weights/load", json={"path": str(folder)}, timeout=300)
        assert r.status_code in (403, 422), (case, r.status_code, r.text)
        body = r.json()
        assert body["details"][0]["field"] == "path", (case, body)
        print(f"{case}: {r.status_code} {body['details'][0]['reason'][:160]}")
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200, case
    assert _greedy(server.url) == before
    assert _version(server.url) == version


@pytest.mark.parametrize("path", ["x" * 5000, "/tmp/a\x00b", ""])
def test_hostile_paths_name_the_field(server, path):
    r = httpx.post(server.url + "/v1/weights/load", json={"path": path}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["details"][0]["field"] == "path"


def test_a_sound_checkpoint_passes_the_same_checks(server, default_model_dir):
    before, version = _greedy(server.url), _version(server.url)
    r = httpx.post(server.url + "/v1/weights/load", json={"path": str(default_model_dir)},
                   timeout=300)
    assert r.status_code == 200, r.text
    new = r.json()["version"]
    assert new != version and _version(server.url) == new
    assert _greedy(server.url) == before


def _load(url: str, folder) -> dict:
    r = httpx.post(url + "/v1/weights/load", json={"path": str(folder), "checksum": True},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _output(url: str) -> tuple[list[int], list[float]]:
    """What the loaded weights do: greedy tokens and their log-probabilities."""
    r = httpx.post(url + "/v1/completions", json={
        "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
        "logprobs": 0, "return_token_ids": True}, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def test_the_checksum_and_the_output_follow_the_loaded_weights(server, default_model_dir,
                                                               weights_root):
    """On the CPU the checksum is a digest of the weight files loaded (vLLM packs linear
    weights into its GEMM kernels and empties the parameters its own digests read), so
    equal checksums alone would only compare files with files. What is loaded is checked
    by output: changed weights give another checksum and other tokens and log-probs; the
    original weights bring back the original checksum and exactly the original output.
    Only linear layers change, the ones vLLM's own digests miss on the CPU."""
    tensors = load_file(str(default_model_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("mlp.down_proj.weight")]:
        tensors[name] = torch.zeros_like(tensors[name])
    changed_dir = weights_root / "zeroed-mlp"
    changed_dir.mkdir(exist_ok=True)
    save_file(tensors, str(changed_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    served = _output(server.url)
    original = _load(server.url, default_model_dir)
    original_output = _output(server.url)
    try:
        changed = _load(server.url, changed_dir)
        changed_output = _output(server.url)
        assert _version(server.url) == changed["version"] != original["version"]
    finally:
        restored = _load(server.url, default_model_dir)
    restored_output = _output(server.url)
    assert original_output == served  # the default weights were loaded already
    assert changed["checksum"] != original["checksum"]
    assert changed_output[0] != original_output[0]
    assert restored["checksum"] == original["checksum"]
    assert restored_output == original_output  # tokens and log-probs, exactly
    assert _version(server.url) == restored["version"]

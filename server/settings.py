"""Server settings: one dataclass, one docstring per field (also the CLI's --help)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


@dataclass
class ServerSettings:
    model: str = "default"
    """Hugging Face id or local folder; `default` = the embedded SmolLM2-135M-Instruct."""
    served_model_name: str | None = None
    """Name reported by /v1/models and accepted in requests (default: derived from model)."""
    dtype: str = "auto"
    """Model dtype for vLLM; `auto` = the model's own on GPU, and on the CPU bfloat16 only
    where the CPU has native bf16 (AVX512-BF16/AMX), else float32 (measured 4x faster on an
    AVX2-only CPU). Entropy is always computed in float32."""
    max_model_len: int = 2048
    """Longest prompt + completion the engine accepts."""
    max_num_seqs: int = 64
    """Requests the engine batches at once."""
    tensor_parallel_size: int = 1
    """Tensor-parallel workers (GPU)."""
    data_parallel_size: int = 1
    """Data-parallel engine replicas."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs: CPU start-up ~25 s instead of ~115 s."""
    kv_cache_gib: float | None = None
    """KV-cache size in GiB (CPU: default 2); None = vLLM's default on GPU."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may take (GPU only)."""
    chunked_prefill: bool | None = None
    """None = off on the CPU (vLLM's CPU sampler crashes on a seeded request whose prefill
    is chunked: it rewinds a CPU torch.Generator by offset, which CPU generators lack)."""
    seed: int = 0
    """Engine seed."""
    entropy: bool = True
    """Load the entropy logits processor (off only to measure its cost)."""
    max_problems: int = 64
    """Most problems one /v1/compress request may carry."""
    max_n: int = 64
    """Most samples per prompt (n)."""
    step_delimiter: str = "\n\n"
    """Default step delimiter (the paper's); the default model rarely leaves blank lines,
    so `stepzip serve` on it uses a single newline unless told otherwise."""
    host: str = "127.0.0.1"
    """Bind address."""
    port: int = 8000
    """Bind port."""
    api_key: str | None = None
    """When set, every route but /health needs `Authorization: Bearer <key>`."""
    enable_weight_routes: bool = False
    """Expose weight loading / transfer routes."""
    weights_root: str | None = None
    """Checkpoint folders for /v1/weights/load must lie under this folder."""
    extra_engine_args: dict = field(default_factory=dict)
    """Passed through to vLLM's AsyncEngineArgs."""

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Docstrings of the fields, parsed from the source (for --help)."""
        import ast
        import inspect
        import textwrap

        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs = {}
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        return docs

    @classmethod
    def from_env(cls, **overrides) -> ServerSettings:
        """STEPZIP_<FIELD> environment variables, then explicit overrides."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"STEPZIP_{f.name.upper()}")
            if raw is None or f.name == "extra_engine_args":
                continue
            values[f.name] = _parse(raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(raw: str, default):
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw

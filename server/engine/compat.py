"""Start-up check of vLLM's logits-processor interfaces against the ones stepzip's
entropy processors were written for.

vLLM documents both interfaces as subject to change, and Model Runner V2's has already
had another signature, so a server on an untested vLLM fails at start-up with a clear
error instead of computing entropies from misread batch rows.
"""

from __future__ import annotations

import inspect
import logging

log = logging.getLogger("stepzip.engine")

# vLLM minor lines whose processor interfaces were read and tested.
SUPPORTED_VLLM = ("0.32",)

# Parameter names (self excluded) of the methods each adapter relies on.
V1_INTERFACE = {
    "__init__": ("vllm_config", "device", "is_pin_memory"),
    "update_state": ("batch_update",),
    "apply": ("logits",),
    "is_argmax_invariant": (),
}
V2_INTERFACE = {
    "__init__": ("vllm_config", "req_states"),
    "add_request": ("req_idx", "sampling_params"),
    "apply_staged_writes": (),
    "apply": ("logits", "ctx"),
}
V2_CONTEXT_FIELDS = ("expanded_idx_mapping", "pos")
V2_STATE_FIELDS = ("device", "max_num_reqs", "prompt_len", "prefill_len")


class UnsupportedVllm(RuntimeError):
    """vLLM's logits-processor interface is not the one stepzip was written for."""


def interface_problems(cls: type, expected: dict[str, tuple[str, ...]]) -> list[str]:
    """What differs between `cls`'s methods and the expected parameter names."""
    problems = []
    for name, params in expected.items():
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"{cls.__name__}.{name} is missing")
            continue
        got = tuple(p for p in inspect.signature(method).parameters if p not in ("self", "cls"))
        if got != params:
            problems.append(f"{cls.__name__}.{name}{got} (expected {params})")
    return problems


def field_problems(cls: type, fields: tuple[str, ...]) -> list[str]:
    names = (set(getattr(cls, "__dataclass_fields__", {}))
             or set(getattr(cls, "__struct_fields__", ())) or set(vars(cls)))  # msgspec
    return [f"{cls.__name__}.{f} is missing" for f in fields if f not in names]


def check_processor_interface(use_v2: bool, version: str | None = None) -> None:
    """Raise UnsupportedVllm naming the supported versions when this vLLM's interface for
    the runner in use differs from the one the adapter was written for."""
    import vllm

    version = version or vllm.__version__
    problems = []
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM:
        if use_v2:  # V2's row/slot semantics can change under an unchanged signature
            problems.append(f"vLLM {version} is not a tested line")
        else:
            log.warning("vLLM %s is untested with stepzip (tested: %s); the legacy "
                        "processor interface matches", version, ", ".join(SUPPORTED_VLLM))
    if use_v2:
        from vllm.v1.worker.gpu.sample import logits_processor as v2

        problems += interface_problems(v2.LogitsProcessor, V2_INTERFACE)
        problems += field_problems(v2.LogitsContext, V2_CONTEXT_FIELDS)
        problems += field_problems(v2.LogitsProcRequestState, V2_STATE_FIELDS)
    else:
        from vllm.v1.sample import logits_processor as v1

        problems += interface_problems(v1.LogitsProcessor, V1_INTERFACE)
    if problems:
        runner = "Model Runner V2" if use_v2 else "the legacy (V1) model runner"
        supported = ", ".join(f"{line}.x" for line in SUPPORTED_VLLM)
        raise UnsupportedVllm(
            f"stepzip's entropy processor supports vLLM {supported} ({runner}); this "
            f"install differs: {'; '.join(problems)}. Install a supported vLLM "
            f"(pip install 'vllm=={SUPPORTED_VLLM[-1]}.*'), or serve without entropies "
            f"(--no-entropy).")


# What prefill scoring (server/engine/prefill.py) uses of the legacy runner, by parameter
# names; the runner's instance attributes are checked in the worker when it is installed.
PREFILL_INTERFACE = {
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner": {
        "_get_prompt_logprobs_dict": ("hidden_states", "num_scheduled_tokens"),
        "_sync_device": (),
    },
    "vllm.v1.sample.sampler:Sampler": {
        "compute_logprobs": ("logits",),
        "gather_logprobs": ("logprobs", "num_logprobs", "token_ids"),
    },
    "vllm.v1.outputs:LogprobsTensors": {
        "empty_cpu": ("num_positions", "num_tokens_per_position"),
    },
}
PREFILL_FIELDS = {
    "vllm.v1.worker.gpu_input_batch:CachedRequestState": (
        "prompt_token_ids", "sampling_params", "num_computed_tokens",
        "in_progress_prompt_logprobs_cpu"),
    "vllm.sampling_params:SamplingParams": (
        "prompt_logprobs", "skip_reading_prefix_cache", "extra_args", "detokenize"),
}


def _load(path: str) -> type:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def prefill_problems(use_v2: bool, version: str | None = None) -> list[str]:
    """Why this vLLM cannot score by prefill (empty: it can). Model Runner V2 computes
    prompt logprobs elsewhere, with no method to stand in for."""
    import vllm

    version = version or vllm.__version__
    if use_v2:
        return ["Model Runner V2 is in use (prefill scoring is written for the legacy runner)"]
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM:
        return [f"vLLM {version} is not a tested line"]
    problems = []
    for path, methods in PREFILL_INTERFACE.items():
        problems += interface_problems(_load(path), methods)
    for path, fields in PREFILL_FIELDS.items():
        problems += field_problems(_load(path), fields)
    return problems

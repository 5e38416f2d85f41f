"""All-or-nothing weight loads, on the worker side (called from worker_ext.py).

`dry_run_load` feeds the model's own `load_weights` meta tensors shaped like the
checkpoint's, with every parameter's weight loader swapped for a recorder: the model maps
checkpoint names to parameters exactly as a real load would (stacked q/k/v, tied
embeddings, unknown-name errors), but nothing is copied. `reload_or_restore` reloads in
place and, when that fails half-way, puts the previous checkpoint back: vLLM's in-place
reload moves layers to the meta device first, so an exception there leaves a model that
kills the engine at its next step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

_MISSING = object()

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def dry_run_load(model: torch.nn.Module, tensors: list[tuple[str, list[int], str]],
                 tp_size: int = 1, limit: int = 20) -> list[str]:
    """Problems a real load of `tensors` (name, shape, safetensors dtype) would hit; []
    when every parameter would be filled exactly once with matching shapes."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    loaded: dict[str, int] = defaultdict(int)  # parameter -> elements the checkpoint fills
    problems: list[str] = []
    source: dict[str, str] = {}
    sharded: set[str] = set()  # parameters stacked from several checkpoint tensors

    def expected_shape(name: str, param) -> list[int]:
        # Embeddings are padded to a multiple of 64 rows; the checkpoint holds the
        # original vocabulary (vLLM's loader asserts the same).
        module = model.get_submodule(name.rpartition(".")[0])
        rows = getattr(module, "org_vocab_size", None)
        return [rows or param.shape[0], *param.shape[1:]]

    logical = {name: checkpoint_format(model, name, p) for name, p in params.items()}

    def record(param, weight, *shard, **kw):
        name = names.get(id(param), "?")
        where = source.get("current", name)
        param = logical.get(name, param)
        if weight.is_floating_point() != param.is_floating_point():
            problems.append(f"{where}: dtype {weight.dtype} cannot load into {param.dtype}")
        if shard or kw:  # one of q/k/v or gate/up: its rows are a slice of the parameter
            sharded.add(name)
        if tp_size == 1 and param.dim() > 0:
            got, want = list(weight.shape), expected_shape(name, param)
            if name in sharded:
                got, want = got[1:], want[1:]
            if got != want:
                problems.append(f"{where}: shape {list(weight.shape)} does not fit {name} "
                                f"{list(param.shape)}")
        loaded[name] += weight.numel()

    def metas():
        for name, shape, dtype in tensors:
            source["current"] = name
            yield name, torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")

    saved = {n: getattr(p, "weight_loader", _MISSING) for n, p in params.items()}
    try:
        for p in params.values():
            p.weight_loader = record
        model.load_weights(metas())
    except Exception as exc:  # noqa: BLE001 - the model's own loader refused a name or a shape
        problems.append(f"{source.get('current', 'checkpoint')}: {type(exc).__name__}: {exc}")
    finally:
        for n, p in params.items():
            if saved[n] is _MISSING:
                del p.weight_loader
            else:
                p.weight_loader = saved[n]
    for name, p in logical.items():
        if loaded[name] == 0:
            problems.append(f"{name}: missing from the checkpoint")
        elif tp_size == 1 and name in sharded and loaded[name] != p.numel():
            problems.append(f"{name}: the checkpoint fills {loaded[name]} of its "
                            f"{p.numel()} elements")
    return problems[:limit]


def checkpoint_format(model: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The parameter as the checkpoint holds it. After loading, backends may repack a
    weight (vLLM's CPU GEMM leaves an empty parameter behind); vLLM records each layer's
    checkpoint-format tensors on the meta device for in-place reloads: use those."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    module_name, _, param_name = name.rpartition(".")
    info = LAYERWISE_INFO.get(model.get_submodule(module_name))
    recorded = info.restore_metadata[0].get(param_name) if info is not None else None
    return recorded if recorded is not None else param


def reload_or_restore(worker, path: str, previous: str) -> str | None:
    """Reload from `path`; on failure restore `previous` and return the error."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    try:
        worker.reload_weights(weights_path=path)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure: restore, then report it
        error = f"{type(exc).__name__}: {exc}"
    model = worker.model_runner.get_model()
    finalize_layerwise_reload(model, worker.vllm_config.model_config)  # undo the meta swap
    worker.reload_weights(weights_path=previous)  # raises only if the engine is beyond help
    return error

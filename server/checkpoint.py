"""Reading a checkpoint folder for /v1/weights/load without loading it: which files vLLM
would read, that each really lies under an allowed root (symlinks resolved), and every
tensor's name, shape and dtype from the safetensors headers (the library's own parser,
which also refuses truncated and foreign files). The engine then dry-runs the names and
shapes against the model (server/engine/weightcheck.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"  # vLLM loads only the files it names
MAX_PATH_CHARS = 4096


class CheckpointError(ValueError):
    """The folder cannot be loaded; the message says which file and why."""


def resolve_folder(raw: str, roots: list[Path]) -> Path:
    """The folder `raw` names, if it is one under an allowed root (PermissionError if not)."""
    if len(raw) > MAX_PATH_CHARS:
        raise CheckpointError(f"longer than {MAX_PATH_CHARS} characters")
    if "\x00" in raw:
        raise CheckpointError("contains a NUL byte")
    path = Path(raw).expanduser().resolve()
    if not _under(path, roots):
        raise PermissionError(f"{raw!r} is outside the allowed weights roots")
    if not path.is_dir():
        raise CheckpointError(f"{raw!r} is not a folder")
    return path


def read_checkpoint(folder: Path, roots: list[Path]) -> list[tuple[str, list[int], str]]:
    """(name, shape, safetensors dtype) of every tensor vLLM would load from `folder`."""
    from safetensors import SafetensorError, safe_open

    for entry in folder.iterdir():  # every file, not just the weights: nothing escapes
        if not _under(entry.resolve(), roots):
            raise PermissionError(f"{entry.name} links outside the allowed weights roots")
    files = _weight_files(folder)
    tensors, seen = [], {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    if name in seen:
                        raise CheckpointError(f"{file.name}: tensor {name} also in {seen[name]}")
                    seen[name] = file.name
                    piece = f.get_slice(name)
                    tensors.append((name, list(piece.get_shape()), piece.get_dtype()))
        except SafetensorError as exc:
            raise CheckpointError(f"{file.name}: not a readable safetensors file ({exc})") from exc
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors")
    return tensors


def checkpoint_digest(folder: Path) -> str:
    """sha256 over the weight files vLLM loads from `folder`, in name order."""
    digest = hashlib.sha256()
    for file in _weight_files(Path(folder)):
        digest.update(f"{file.name};".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{INDEX_FILE}: no readable weight_map ({exc})") from exc
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file() or f.parent != folder]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} names missing files: {missing[:5]}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError("holds no *.safetensors file")
    return files


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)

"""Reading a checkpoint folder before a weight load: what is refused, and why."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from server.checkpoint import CheckpointError, read_checkpoint, resolve_folder


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    save_file({"a.weight": torch.zeros(3, 2), "b.bias": torch.ones(3, dtype=torch.bfloat16)},
              str(root / "ok" / "model.safetensors"))
    return root


def test_a_sound_folder_lists_every_tensor(root):
    tensors = read_checkpoint(resolve_folder(str(root / "ok"), [root]), [root])
    assert sorted(tensors) == [("a.weight", [3, 2], "F32"), ("b.bias", [3], "BF16")]


@pytest.mark.parametrize("raw,error", [("x" * 5000, CheckpointError), ("/a\x00b", CheckpointError),
                                       ("/etc", PermissionError)])
def test_hostile_paths(root, raw, error):
    with pytest.raises(error):
        resolve_folder(raw, [root])


def test_a_symlinked_file_pointing_out_of_the_root_is_refused(root, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes((root / "ok" / "model.safetensors").read_bytes())
    (root / "ok" / "other.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(PermissionError, match="other.safetensors"):
        read_checkpoint(root / "ok", [root])


def test_truncated_and_foreign_files_are_refused(root):
    data = (root / "ok" / "model.safetensors").read_bytes()
    (root / "ok" / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint(root / "ok", [root])
    (root / "ok" / "model.safetensors").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(root / "ok", [root])


def test_the_index_decides_which_files_load_and_must_not_name_missing_ones(root):
    (root / "ok" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing files"):
        read_checkpoint(root / "ok", [root])


def test_a_tensor_in_two_files_is_refused(root):
    save_file({"a.weight": torch.zeros(3, 2)}, str(root / "ok" / "more.safetensors"))
    with pytest.raises(CheckpointError, match="also in"):
        read_checkpoint(root / "ok", [root])

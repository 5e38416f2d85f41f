"""One real stepzip server (vLLM engine on the CPU) shared by every integration test.

float32 is forced so the entropy oracle does not depend on whether this CPU has native
bf16 (it decides `--dtype auto`).
"""

from __future__ import annotations

import os

import pytest

from clients.client import StepzipClient
from clients.launcher import ServerProcess

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory):
    """Checkpoints the shared server may load (besides the default model's own folder)."""
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def server(default_model_dir, weights_root):
    roots = os.pathsep.join([str(weights_root), str(default_model_dir)])
    argv = ["serve", "--model", str(default_model_dir), "--served-model-name", "smollm2",
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "64", "--max-problems", "8", "--step-delimiter", "\\n",
            "--enable-weight-routes", "--weights-root", roots]
    with ServerProcess(argv, timeout=600) as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server):
    with StepzipClient(server.url, timeout=600) as c:
        yield c

"""Start-up check of vLLM's logits-processor interfaces (server/engine/compat.py)."""

from __future__ import annotations

import pytest

from server.engine.compat import (
    SUPPORTED_VLLM,
    V2_INTERFACE,
    UnsupportedVllm,
    check_processor_interface,
    interface_problems,
)


def test_this_vllm_passes_on_both_runners():
    check_processor_interface(use_v2=False)
    check_processor_interface(use_v2=True)


def test_an_untested_line_stops_v2_with_the_supported_versions_named():
    with pytest.raises(UnsupportedVllm) as info:
        check_processor_interface(use_v2=True, version="0.33.0")
    message = str(info.value)
    assert "0.33.0" in message and all(f"{v}.x" in message for v in SUPPORTED_VLLM)
    check_processor_interface(use_v2=False, version="0.33.0")  # legacy: warns only


def test_another_v2_signature_is_reported():
    class OlderV2:  # the shape of an earlier V2 interface: rows passed as tensors
        def __init__(self, vllm_config, device, max_num_reqs): ...
        def add_request(self, req_idx, sampling_params): ...
        def apply_staged_writes(self): ...
        def apply(self, logits, idx_mapping, pos): ...

    problems = interface_problems(OlderV2, V2_INTERFACE)
    assert any("apply" in p and "idx_mapping" in p for p in problems)
    assert any("__init__" in p for p in problems)
    assert "Missing.add_request is missing" in interface_problems(type("Missing", (), {}),
                                                                  V2_INTERFACE)

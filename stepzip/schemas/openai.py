"""The `stepzip` extension of the OpenAI-shaped routes, and the weight-load schemas.

The completion/chat requests and responses themselves are vLLM's own models (see
server/services/openai.py); only what stepzip adds is defined here, so clients can use
it without vLLM.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from stepzip.constants import MARKER
from stepzip.schemas.compress import StepOut


class StepzipOptions(BaseModel):
    """Opt-in per request: computed in the same generation pass, one object per choice."""

    model_config = ConfigDict(extra="forbid")
    entropies: bool = Field(False, description="Per-token entropies (nats, temperature 1).")
    steps: bool = Field(False, description="Steps with entropy statistics.")
    delimiter: str | None = Field(None, min_length=1, max_length=16,
                                  description="Step delimiter (default: the server's).")
    marker: str = Field(MARKER, min_length=1, max_length=64)


class ChoiceStepzip(BaseModel):
    """The `stepzip` object of a choice (the final chunk's choice when streaming)."""

    entropies: list[float] | None = None
    steps: list[StepOut] | None = None
    n_steps: int = 0
    n_skips: int = 0
    skip_ratio: float = 0.0
    entropy_total: float | None = None


class WeightsLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="Checkpoint folder (config + safetensors).")
    checksum: bool = Field(True, description="Report a checksum of the loaded weights.")


class WeightsLoadResponse(BaseModel):
    version: str
    checksum: str | None
    seconds: float
    path: str

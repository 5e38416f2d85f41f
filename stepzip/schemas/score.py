"""POST /v1/score: (problem, reasoning) pairs in, the /v1/compress response out.

The reasoning is teacher-forced through the model: each of its tokens gets the entropy
of the model's full next-token distribution at that position (nats, temperature 1, as
in /v1/compress), computed by one prefill pass over prompt + reasoning (or, where the
server's model runner cannot, one forced decode step per token: /health `scoring`);
then the steps, variants and optional answers are built exactly as /v1/compress builds
them for a generated trace. `step_score: "sampled"` uses each given token's logprob
under the model's own distribution; a forcing server refuses it (422, `step_score`). Text that is not valid UTF-8 (lone
surrogates) fails pydantic's own string validation, naming the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stepzip.schemas.compress import (
    CompressionOptions,
    CompressRequest,
    CompressResponse,
    Problem,
    Sampling,
)


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be blank")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pair(_Strict):
    problem: str = Field(min_length=1, max_length=100_000, description="The problem statement.")
    reasoning: str | None = Field(
        None, min_length=1, max_length=1_000_000,
        description="The model's completion for this problem, as the model wrote it after "
                    "the prompt: the reasoning, optionally followed by `</think>` (thinking "
                    "models) or the final-answer line. It is encoded with the model's "
                    "tokenizer; give `reasoning_ids` instead to score the exact tokens.")
    reasoning_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=1_000_000,
        description="The completion's token ids as the model produced them. Exact where "
                    "text is not: a sampled sequence need not be the tokenizer's own split "
                    "of its text (e.g. one '\\n\\n' token vs two '\\n'). Give this or "
                    "`reasoning`; either must fit the model length with the prompt.")
    answer: str | None = Field(None, max_length=10_000, description="Gold answer, for grading.")
    id: str | None = Field(None, max_length=200)

    _blank = field_validator("problem", "reasoning")(_not_blank)

    @model_validator(mode="after")
    def _one_reasoning(self) -> Pair:
        if (self.reasoning is None) == (self.reasoning_ids is None):
            raise ValueError("give exactly one of reasoning or reasoning_ids")
        return self


class ScoreRequest(CompressionOptions):
    pairs: list[Pair] = Field(min_length=1, description="Scored together in one engine batch.")
    answer: bool = Field(False, description="Answer from each compressed variant.")

    def to_compress(self) -> CompressRequest:
        """The equivalent /v1/compress request (one greedy trace per pair; the sampling
        settings are unused: the engine emits the given tokens)."""
        return CompressRequest(
            problems=[Problem(text=p.problem, id=p.id, answer=p.answer) for p in self.pairs],
            sampling=Sampling(n=1, temperature=0.0),
            **self.model_dump(exclude={"pairs"}))


class ScoreResponse(CompressResponse):
    """The /v1/compress response. Each pair is one trace; its `finish_reason` is null
    (the reasoning was given, not generated) and `usage.completion_tokens` counts the
    scored tokens."""

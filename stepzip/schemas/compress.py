"""Request/response models of the stepzip API: the one schema, used by server and clients.

Units: entropies are in nats, of the model's full next-token distribution after
bias/penalties and before temperature/top-k/top-p (i.e. at temperature 1).
"""

from __future__ import annotations

import math
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stepzip import papercode
from stepzip.compression import PruneSpec, validate_spec
from stepzip.constants import MARKER

Strategy = Literal["low", "high", "random", "token", "adaptive"]
StepScore = Literal["sum", "mean", "sampled"]
Preset = Literal["default", "paper-code"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(_Strict):
    text: str = Field(min_length=1, max_length=100_000, description="The problem statement.")
    id: str | None = Field(None, max_length=200)
    answer: str | None = Field(None, max_length=10_000, description="Gold answer, for grading.")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class Sampling(_Strict):
    max_tokens: int = Field(256, ge=1, description="Reasoning tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, description="Traces per problem (each its own request).")
    stop: list[str] | None = Field(None, max_length=16,
                                   description="Stop strings; entropies cover every returned "
                                               "token, the stop string's own tokens included.")


class VariantSpec(_Strict):
    strategy: Strategy = "low"
    ratio: float | None = Field(0.8, description="kappa: fraction of steps to prune, in [0, 1].")
    seed: int = Field(0, ge=0, description="For strategy=random.")
    threshold: float | None = Field(None, description="adaptive: prune steps with entropy < this.")
    mass: float | None = Field(None, description="adaptive: prune up to this entropy fraction.")

    @field_validator("threshold", "mass", "ratio")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _check(self) -> VariantSpec:
        # compress()'s own rules, so a spec accepted here never fails after generating
        validate_spec(PruneSpec(strategy=self.strategy, ratio=self.ratio, seed=self.seed,
                                threshold=self.threshold, mass=self.mass))
        return self


class CompressionOptions(_Strict):
    """What /v1/compress and /v1/score share: the variants, how steps are cut and ranked,
    the prompt, and what the response includes."""

    variants: list[VariantSpec] = Field(default_factory=lambda: [VariantSpec()], min_length=1,
                                        max_length=32)
    answer_max_tokens: int = Field(64, ge=1)
    delimiter: str | None = Field(None, min_length=1, max_length=16,
                                  description="Step delimiter; default is the server's.")
    marker: str = Field(MARKER, min_length=1, max_length=64)
    merge_runs: bool = False
    prompt_template: str | None = Field(
        None, max_length=20_000,
        description="User message template with exactly one kind of field, {problem} "
                    "(no format spec or conversion; double braces for literal ones); "
                    "default is the server's. /v1/score: use the one the reasoning was "
                    "generated with.")
    system: str | None = Field(None, max_length=20_000, description="Optional system message.")
    return_tokens: bool = Field(False, description="Include per-token ids and entropies.")
    step_score: StepScore = Field(
        "sum", description="What steps are ranked by for pruning: 'sum' of the step's token "
        "entropies (the paper's equation), their 'mean', or 'sampled': the mean over the "
        "step's tokens of -p*log p of the sampled token, p from its logprob (the paper's "
        "released code; the logprob is vLLM's, of the raw logits). Reported as steps[].score.")
    preset: Preset = Field(
        "default", description="'paper-code': the rules of the authors' released scripts "
        "(stepzip.papercode): a step ends only at a token that is exactly '\\n\\n'; "
        "step score = mean -p*log p of the sampled tokens; identical stripped steps "
        "collapse; int(N*kappa) pruned; pieces stripped and joined with no separator; "
        "answers sampled at T 0.6 after '\\n</think>\\n\\n'. It sets step_score "
        "'sampled' and the '\\n\\n' delimiter (other values are refused) and, unless "
        "given, its user template (and on /v1/compress T 0.6, top-p 0.95). A model "
        "without </think> is noted in the response's notes.")

    @field_validator("prompt_template")
    @classmethod
    def _one_problem_field(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            fields = [f for f in string.Formatter().parse(v) if f[1] is not None]
        except ValueError as exc:  # unbalanced braces
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ }}}}")
        for _, name, spec, conversion in fields:
            if name != "problem" or spec or conversion:
                shown = "{" + name + (f"!{conversion}" if conversion else "") + \
                        (f":{spec}" if spec else "") + "}"
                raise ValueError(f"the only field allowed is {{problem}}, found {shown}")
        if not fields:
            raise ValueError("must contain {problem}")
        return v

    @model_validator(mode="after")
    def _paper_code(self) -> CompressionOptions:
        """paper-code fixes how steps are cut and scored; refuse a request that says
        otherwise rather than silently ignore it."""
        if self.preset != papercode.PRESET:
            return self
        fixed = {"step_score": papercode.STEP_SCORE, "delimiter": papercode.DELIMITER_TOKEN,
                 "merge_runs": False}
        for name, value in fixed.items():
            given = getattr(self, name)
            if name in self.model_fields_set and given is not None and given != value:
                raise ValueError(f"preset paper-code needs {name}={value!r}, got {given!r}")
            setattr(self, name, value)
        if self.prompt_template is None:
            self.prompt_template = papercode.USER_TEMPLATE
        return self


class CompressRequest(CompressionOptions):
    problems: list[Problem] = Field(min_length=1)
    sampling: Sampling = Field(default_factory=Sampling)
    answer: bool = Field(True, description="Answer from each compressed variant.")

    @model_validator(mode="after")
    def _paper_sampling(self) -> CompressRequest:
        """paper-code samples at the scripts' T 0.6 / top-p 0.95 unless told otherwise."""
        if self.preset == papercode.PRESET:
            given = self.sampling.model_fields_set
            if "temperature" not in given:
                self.sampling.temperature = papercode.TEMPERATURE
            if "top_p" not in given:
                self.sampling.top_p = papercode.TOP_P
        return self


class StepOut(BaseModel):
    index: int
    text: str
    token_start: int
    token_end: int
    tokens: int
    entropy_sum: float
    entropy_mean: float
    entropy_max: float
    score: float = Field(description="What pruning ranked this step by (see step_score).")

    @classmethod
    def from_step(cls, s) -> StepOut:
        """From a `stepzip.steps.Step`."""
        return cls(index=s.index, text=s.text, token_start=s.token_start,
                   token_end=s.token_end, tokens=s.n_tokens, entropy_sum=s.entropy_sum,
                   entropy_mean=s.entropy_mean, entropy_max=s.entropy_max,
                   score=s.entropy_sum if s.score is None else s.score)


GradeOutcome = Literal["correct", "wrong", "ungradable", "no_gold"]
GRADE_HELP = ("How grading ended: correct / wrong; `ungradable` when comparing with the gold "
              "ran past the server's grading deadline (--grading-timeout) or failed, so "
              "`correct` is null; `no_gold` when the problem has no answer.")
GRADE_REASON_HELP = "Why the answer is ungradable (null otherwise)."


class VariantOut(BaseModel):
    strategy: Strategy
    ratio: float | None
    threshold: float | None = None
    mass: float | None = None
    kept_steps: list[int]
    skipped_steps: list[int]
    compressed_text: str
    n_steps: int
    n_skipped: int
    tokens_before: int = Field(description="Tokens of the reasoning text, encoded by the "
                                           "model's tokenizer as tokens_after is.")
    tokens_after: int = Field(description="Tokens of the compressed reasoning text, markers "
                                          "included (every strategy: as written).")
    reduction: float = Field(description="1 - tokens_after / tokens_before (0 when nothing "
                                         "was removed).")
    answer_text: str | None = None
    answer_finish_reason: str | None = Field(
        None, description="Why the answer generation stopped ('length': cut off).")
    extracted_answer: str | None = None
    correct: bool | None = None
    grade: GradeOutcome | None = Field(None, description=GRADE_HELP)
    grade_reason: str | None = Field(None, description=GRADE_REASON_HELP)


class TokenOut(BaseModel):
    ids: list[int]
    entropies: list[float]
    pieces: list[str] = Field(description="The text each token adds to the completion "
                                          "(''.join(pieces) == completion).")
    logprobs: list[float] | None = Field(
        None, description="Logprob of each sampled token (step_score='sampled' only).")


class TraceOut(BaseModel):
    sample: int
    completion: str
    reasoning: str
    finish_reason: str | None
    steps: list[StepOut]
    variants: list[VariantOut]
    answer_text: str = Field(description="The part of the completion after the reasoning.")
    extracted_answer: str | None
    correct: bool | None
    grade: GradeOutcome | None = Field(None, description=GRADE_HELP)
    grade_reason: str | None = Field(None, description=GRADE_REASON_HELP)
    completion_tokens: int
    reasoning_tokens: int
    entropy_total: float
    tokens: TokenOut | None = None


class ProblemOut(BaseModel):
    id: str | None
    prompt: str
    gold: str | None
    traces: list[TraceOut]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    answer_tokens: int = 0


class Timings(BaseModel):
    generate_s: float = 0.0
    entropy_fetch_s: float = 0.0
    answer_s: float = Field(0.0, description="Answering from the variants, grading included.")
    grade_s: float = Field(0.0, description="Wall time spent grading answers (bounded by "
                                            "the server's --grading-timeout per answer).")
    total_s: float = 0.0


class CompressResponse(BaseModel):
    model: str
    delimiter: str
    results: list[ProblemOut]
    usage: Usage
    timings: Timings
    notes: list[str] = Field(default_factory=list,
                             description="What the server did differently from what was "
                                         "asked, and why (e.g. paper-code on a model "
                                         "without </think>).")


class ErrorDetail(BaseModel):
    field: str
    reason: str


class ErrorResponse(BaseModel):
    error: str
    details: list[ErrorDetail] = []

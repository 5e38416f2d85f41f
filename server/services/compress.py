"""The /v1/compress pipeline: generate traces with entropies, cut steps, build variants,
answer from each variant concurrently, grade. Engine-bound, HTTP-free.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from vllm.exceptions import VLLMClientError

from server.engine.engine import Engine, Generation
from server.errors import ApiError, invalid
from stepzip import papercode
from stepzip.compression import Compressed, PruneSpec, compress
from stepzip.constants import ANSWER_CUE, THINK_OPEN
from stepzip.grader import Grade, Grader
from stepzip.prompts import THINK_CLOSE, PromptStyle, style_for
from stepzip.schemas import compress as schemas
from stepzip.steps import Step, reasoning_span, segment, token_char_offsets, token_scores
from stepzip.tokens import token_pieces


@dataclass
class Prepared:
    """A validated request's rendered prompts (one per problem) and their ids."""
    prompts: list[str]
    prompt_ids: list[list[int]]
    engine_requests: int  # most engine requests it has in flight at once (for admission)


class Compressor:
    def __init__(self, engine: Engine, default_delimiter: str, gate=None, metrics=None,
                 grader: Grader | None = None):
        self.engine = engine
        self.default_delimiter = default_delimiter
        self.style: PromptStyle = style_for(engine.tokenizer)
        self.gate, self.metrics = gate, metrics
        # Grading runs in the grader's child processes with a deadline, never on the loop.
        self.grader = grader or Grader()

    async def compress(self, req: schemas.CompressRequest) -> schemas.CompressResponse:
        """POST /v1/compress: validate (4xx before any generation), admit, run."""
        self.require_entropy()
        prepared = await self.engine.in_tokenizer_thread(self.prepare, req)
        with self.engine.admission(prepared.engine_requests):
            async with self.gate.generation():
                response = await self.run(req, prepared=prepared)
        if self.metrics is not None:
            self.metrics.observe_compress(response)
        return response

    def prepare(self, req: schemas.CompressRequest) -> Prepared:
        """Check everything the engine would refuse, render and tokenize each prompt once.
        CPU-bound (templating, tokenizing up to 100k characters): run in a thread."""
        s, limit = self.engine.settings, self.engine.max_model_len
        if len(req.problems) > s.max_problems:
            raise invalid("problems", f"at most {s.max_problems} problems per request, "
                                      f"got {len(req.problems)}")
        if req.sampling.n > s.max_n:
            raise invalid("sampling.n", f"at most {s.max_n}, got {req.sampling.n}")
        if req.sampling.seed is not None and self.engine.seed_unsafe:
            raise invalid("sampling.seed", "seeded sampling is unavailable on this CPU server "
                          "because it runs with chunked prefill (restart without "
                          "--chunked-prefill)")
        for field, text in self._texts(req):
            if not _is_utf8(text):
                raise invalid(field, "contains a lone surrogate (not encodable as UTF-8)")
        try:  # vLLM's own checks, before anything is submitted
            self.engine.sampling_params(
                max_tokens=req.sampling.max_tokens, temperature=req.sampling.temperature,
                top_p=req.sampling.top_p, top_k=req.sampling.top_k, seed=req.sampling.seed,
                stop=req.sampling.stop)
        except (ValueError, VLLMClientError) as exc:
            parameter = getattr(exc, "parameter", None)
            raise invalid(f"sampling.{parameter}" if parameter else "sampling", str(exc)) \
                from exc
        for field, value in (("sampling.max_tokens", req.sampling.max_tokens),
                             ("answer_max_tokens", req.answer_max_tokens)):
            if value >= limit:
                raise invalid(field, f"{value} exceeds the model length ({limit})")
        prompts, prompt_ids = self.render(req)
        # The answer prompt holds the reasoning prompt, at most max_tokens of reasoning
        # (compression only shortens it) and the answer cue; the answer follows.
        answer = (len(self.encode(self.style.answer_prompt("", ""))) + req.answer_max_tokens
                  if req.answer else 0)
        for i, ids in enumerate(prompt_ids):
            need = len(ids) + req.sampling.max_tokens
            if need > limit:
                raise invalid(f"problems.{i}.text",
                              f"prompt ({len(ids)} tokens) + sampling.max_tokens "
                              f"({req.sampling.max_tokens}) exceeds the model length ({limit})")
            if need + answer > limit:
                raise invalid("answer_max_tokens",
                              f"problem {i}: prompt ({len(ids)} tokens) + reasoning "
                              f"(sampling.max_tokens {req.sampling.max_tokens}) + answer cue "
                              f"and answer_max_tokens ({answer} tokens) exceed the model "
                              f"length ({limit})")
        samples = len(req.problems) * req.sampling.n
        needed = max(samples, samples * len(req.variants) if req.answer else 0)
        if needed > s.max_pending_requests:
            raise invalid("problems", f"this request needs {needed} engine requests at once "
                          f"(problems x sampling.n x variants), above the server's limit of "
                          f"{s.max_pending_requests}; split it")
        return Prepared(prompts, prompt_ids, needed)

    def render(self, req: schemas.CompressRequest) -> tuple[list[str], list[list[int]]]:
        prompts = [self.style.reasoning_prompt(self.engine.tokenizer, p.text,
                                               req.prompt_template, req.system)
                   for p in req.problems]
        return prompts, [self.encode(p) for p in prompts]

    @staticmethod
    def _texts(req: schemas.CompressRequest):
        for i, p in enumerate(req.problems):
            yield f"problems.{i}.text", p.text
        for field in ("prompt_template", "system", "delimiter", "marker"):
            yield field, getattr(req, field) or ""
        for i, stop in enumerate(req.sampling.stop or []):
            yield f"sampling.stop.{i}", stop

    def encode(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    async def run(self, req: schemas.CompressRequest, forced: list[list[int]] | None = None,
                  prepared: Prepared | None = None) -> schemas.CompressResponse:
        """The engine pipeline (the caller holds the weight gate). `forced` (/v1/score):
        per problem, the tokens to teacher-force instead of sampling (n = 1); everything
        after generation is the same code path. `prepared`: from `prepare`."""
        self.require_entropy()
        started = time.perf_counter()
        usage, timings = schemas.Usage(), schemas.Timings()
        delimiter = req.delimiter or self.default_delimiter
        if prepared is not None:
            prompts, prompt_ids = prepared.prompts, prepared.prompt_ids
        else:
            prompts, prompt_ids = await self.engine.in_tokenizer_thread(self.render, req)

        t0 = time.perf_counter()
        jobs = [self._generate(ids, req.sampling, sample, forced[p] if forced else None,
                               logprobs=req.step_score == "sampled")
                for p, ids in enumerate(prompt_ids) for sample in range(req.sampling.n)]
        generations = await asyncio.gather(*jobs)
        timings.generate_s = time.perf_counter() - t0
        timings.entropy_fetch_s = max((g.entropy_fetch_s for g in generations), default=0.0)

        traces = await self.engine.in_tokenizer_thread(
            lambda: [self._trace(g, i % req.sampling.n, req, delimiter)
                     for i, g in enumerate(generations)])
        golds = [p.answer for p in req.problems]
        t_grade = time.perf_counter()
        grades = await self.grader.agrade_many(
            [(trace.answer_text or trace.completion, golds[i // req.sampling.n])
             for i, (trace, _) in enumerate(traces)])
        for (trace, _), g in zip(traces, grades, strict=True):
            set_grade(trace, g)
        timings.grade_s = time.perf_counter() - t_grade

        t1 = time.perf_counter()
        if req.answer:
            timings.grade_s += await self._answer_variants(req, prompts, traces, golds, usage)
        timings.answer_s = time.perf_counter() - t1

        results = []
        for p_idx, problem in enumerate(req.problems):
            chunk = traces[p_idx * req.sampling.n:(p_idx + 1) * req.sampling.n]
            results.append(schemas.ProblemOut(id=problem.id, prompt=prompts[p_idx],
                                              gold=problem.answer,
                                              traces=[t for t, _ in chunk]))
        usage.prompt_tokens = sum(len(ids) for ids in prompt_ids) * req.sampling.n
        usage.completion_tokens = sum(len(g.token_ids) for g in generations)
        timings.total_s = time.perf_counter() - started
        notes = self._paper_code_notes() if req.preset == papercode.PRESET else []
        return schemas.CompressResponse(model=self.engine.model_name, delimiter=delimiter,
                                        results=results, usage=usage, timings=timings,
                                        notes=notes)

    def require_entropy(self) -> None:
        """Refuse to rank steps when the engine computes no entropies: every step would
        score 0 and pruning would silently fall back to step order."""
        if not self.engine.settings.entropy:
            raise ApiError(409, "this server runs without the entropy processor "
                                "(--no-entropy): step entropies, and so compression, are "
                                "unavailable; restart it without --no-entropy",
                           "server", "started with --no-entropy")

    async def _generate(self, prompt_ids: list[int], s: schemas.Sampling,
                        sample: int, forced: list[int] | None = None,
                        logprobs: bool = False) -> Generation:
        if forced is not None:
            return await self.engine.score(prompt_ids, forced, logprobs=logprobs)
        params = self.engine.sampling_params(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=None if s.seed is None else s.seed + sample, stop=s.stop,
            logprobs=0 if logprobs else None)
        return await self.engine.generate(prompt_ids, params, entropy=True)

    def _trace(self, g: Generation, sample: int, req: schemas.CompressRequest,
               delimiter: str) -> tuple[schemas.TraceOut, list[tuple[Compressed, str]]]:
        # Offsets come from our own decode of the returned ids, so text and tokens agree
        # even where vLLM trimmed a stop string from its text.
        pieces = token_pieces(self.decode, g.token_ids, self.engine.decode_many)
        text = "".join(pieces)
        offsets = token_char_offsets(pieces)
        entropies = g.entropies or [0.0] * len(g.token_ids)
        logprobs = sampled_logprobs(g) if req.step_score == "sampled" else None
        steps: list[Step] = []
        span = (0, 0)
        if text and req.preset == papercode.PRESET:
            end, steps = papercode.trace_steps(pieces, logprobs, entropies,
                                               thinking=self.style.thinking)
            span = (0, end)
        elif text:
            span = reasoning_span(text, think_open=THINK_OPEN, think_close=THINK_CLOSE,
                                  thinking=self.style.thinking)
            steps = segment(text, offsets, entropies, delimiter=delimiter, span=span,
                            score=req.step_score, sampled_logprobs=logprobs)
        token_values = token_scores(req.step_score, entropies, logprobs, len(offsets))
        reasoning = text[span[0]:span[1]]
        variants = []
        for v in req.variants:
            spec = PruneSpec(strategy=v.strategy, ratio=v.ratio, seed=v.seed,
                             threshold=v.threshold, mass=v.mass, marker=req.marker,
                             merge_runs=req.merge_runs,
                             paper_code=req.preset == papercode.PRESET)
            c = compress(steps, spec, token_entropies=token_values, token_offsets=offsets,
                         text=text, delimiter=delimiter)
            variants.append((c, v))
        answer_text = text[span[1]:]
        n_reasoning = (papercode.reasoning_tokens(pieces, span[1])
                       if req.preset == papercode.PRESET  # repeats left the steps
                       else sum(s.n_tokens for s in steps))
        out = schemas.TraceOut(
            sample=sample, completion=text, reasoning=reasoning, finish_reason=g.finish_reason,
            steps=[schemas.StepOut.from_step(s) for s in steps],
            variants=[self._variant_out(c, v, reasoning) for c, v in variants],
            answer_text=answer_text, extracted_answer=None, correct=None,
            completion_tokens=len(g.token_ids), reasoning_tokens=n_reasoning,
            entropy_total=float(sum(entropies)),
            tokens=schemas.TokenOut(ids=g.token_ids, entropies=entropies, pieces=pieces,
                                    logprobs=logprobs)
            if req.return_tokens else None,
        )
        return out, [(c, v) for c, v in variants]

    def _paper_code_notes(self) -> list[str]:
        """Where this server cannot follow the authors' scripts, and what it does."""
        notes = [] if self.style.thinking else [papercode.NO_THINK_NOTE]
        if self.engine.settings.logprobs_mode != papercode.RAW_LOGPROBS:
            notes.append(papercode.LOGPROBS_NOTE)
        return notes

    def _variant_out(self, c: Compressed, v: schemas.VariantSpec,
                     reasoning: str) -> schemas.VariantOut:
        # Before and after from one encoding of text, so an untouched reasoning reduces
        # by exactly 0 and a marker costs its tokens in every strategy.
        before = len(self.encode(reasoning)) if c.n_steps else 0
        after = len(self.encode(c.text)) if c.text else 0
        return schemas.VariantOut(
            strategy=v.strategy, ratio=v.ratio if v.strategy != "adaptive" else None,
            threshold=v.threshold, mass=v.mass, kept_steps=list(c.kept),
            skipped_steps=list(c.pruned), compressed_text=c.text, n_steps=c.n_steps,
            n_skipped=c.n_skipped, tokens_before=before, tokens_after=after,
            reduction=(1.0 - after / before) if before else 0.0)

    async def _answer_variants(self, req, prompts, traces, golds, usage) -> float:
        """Answer from every variant and grade the answers; returns the grading time."""
        jobs, slots = [], []
        paper = req.preset == papercode.PRESET
        answer_prompt = (papercode.answer_prompt if paper and self.style.thinking
                         else self.style.answer_prompt)
        answer_ids = await self.engine.in_tokenizer_thread(
            lambda: [[self.encode(answer_prompt(prompts[i // req.sampling.n], c.text))
                      for c, _ in variants] for i, (_, variants) in enumerate(traces)])
        for i, (trace, variants) in enumerate(traces):
            p_idx = i // req.sampling.n
            for v_idx, ids in enumerate(answer_ids[i]):
                # Re-tokenized text with markers can outgrow the checked bound by a few
                # tokens: answer in what room is left rather than fail the request.
                room = self.engine.max_model_len - len(ids)
                if room < 1:
                    trace.variants[v_idx].answer_finish_reason = "length"
                    continue
                # A plain model states its answer on the cue's line; stop there.
                params = self.engine.sampling_params(
                    max_tokens=min(req.answer_max_tokens, room),
                    temperature=papercode.ANSWER_TEMPERATURE if paper else 0.0,
                    stop=None if self.style.thinking else ["\n"])
                jobs.append(self.engine.generate(ids, params, entropy=False))
                slots.append((trace, v_idx, golds[p_idx]))
        answers = await asyncio.gather(*jobs)
        started = time.perf_counter()
        grades = await self.grader.agrade_many(
            [(g.text if self.style.thinking else f"{ANSWER_CUE}{g.text}", gold)
             for (_, _, gold), g in zip(slots, answers)])
        for (trace, v_idx, _), g, graded in zip(slots, answers, grades, strict=True):
            out = trace.variants[v_idx]
            out.answer_text = g.text
            out.answer_finish_reason = g.finish_reason
            set_grade(out, graded)
            usage.answer_tokens += len(g.token_ids)
        return time.perf_counter() - started


def set_grade(out: schemas.TraceOut | schemas.VariantOut, g: Grade) -> None:
    out.extracted_answer, out.correct = g.extracted, g.correct
    out.grade, out.grade_reason = g.outcome, g.reason


def sampled_logprobs(g: Generation) -> list[float]:
    """The logprob of each sampled token (the request asked vLLM for logprobs=0)."""
    if g.logprobs is None or len(g.logprobs) != len(g.token_ids):
        raise RuntimeError("the engine returned no logprob per sampled token")
    return [float(position[token].logprob) for position, token in zip(g.logprobs, g.token_ids)]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

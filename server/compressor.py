"""The /v1/compress pipeline: generate traces with entropies, cut steps, build variants,
answer from each variant concurrently, grade. Engine-bound, HTTP-free.
"""

from __future__ import annotations

import asyncio
import time

from stepzip import grading
from stepzip.constants import ANSWER_CUE, THINK_OPEN
from stepzip.schemas import compress as schemas
from stepzip.compression import Compressed, PruneSpec, compress
from server.engine.engine import Engine, Generation
from stepzip.prompts import THINK_CLOSE, PromptStyle, style_for
from stepzip.steps import Step, reasoning_span, segment, token_char_offsets
from stepzip.tokens import token_pieces


class Compressor:
    def __init__(self, engine: Engine, default_delimiter: str):
        self.engine = engine
        self.default_delimiter = default_delimiter
        self.style: PromptStyle = style_for(engine.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    async def run(self, req: schemas.CompressRequest) -> schemas.CompressResponse:
        started = time.perf_counter()
        usage, timings = schemas.Usage(), schemas.Timings()
        delimiter = req.delimiter or self.default_delimiter
        prompts = [self.style.reasoning_prompt(self.engine.tokenizer, p.text,
                                               req.prompt_template, req.system)
                   for p in req.problems]
        prompt_ids = [self.encode(p) for p in prompts]

        t0 = time.perf_counter()
        jobs = [self._generate(ids, req.sampling, sample)
                for ids in prompt_ids for sample in range(req.sampling.n)]
        generations = await asyncio.gather(*jobs)
        timings.generate_s = time.perf_counter() - t0
        timings.entropy_fetch_s = max((g.entropy_fetch_s for g in generations), default=0.0)

        traces = [self._trace(g, i % req.sampling.n, req, delimiter)
                  for i, g in enumerate(generations)]
        golds = [p.answer for p in req.problems]
        for i, (trace, _) in enumerate(traces):
            gold = golds[i // req.sampling.n]
            trace.extracted_answer, trace.correct = grading.grade(
                trace.answer_text or trace.completion, gold)

        t1 = time.perf_counter()
        if req.answer:
            await self._answer_variants(req, prompts, traces, golds, usage)
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
        return schemas.CompressResponse(model=self.engine.model_name, delimiter=delimiter,
                                        results=results, usage=usage, timings=timings)

    async def _generate(self, prompt_ids: list[int], s: schemas.Sampling,
                        sample: int) -> Generation:
        params = self.engine.sampling_params(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=None if s.seed is None else s.seed + sample, stop=s.stop)
        return await self.engine.generate(prompt_ids, params, entropy=True)

    def _trace(self, g: Generation, sample: int, req: schemas.CompressRequest,
               delimiter: str) -> tuple[schemas.TraceOut, list[tuple[Compressed, str]]]:
        # Offsets come from our own decode of the returned ids, so text and tokens agree
        # even where vLLM trimmed a stop string from its text.
        pieces = token_pieces(self.decode, g.token_ids)
        text = "".join(pieces)
        offsets = token_char_offsets(pieces)
        entropies = g.entropies or [0.0] * len(g.token_ids)
        steps: list[Step] = []
        span = (0, 0)
        if text:
            span = reasoning_span(text, think_open=THINK_OPEN, think_close=THINK_CLOSE)
            steps = segment(text, offsets, entropies, delimiter=delimiter, span=span)
        reasoning = text[span[0]:span[1]]
        variants = []
        for v in req.variants:
            spec = PruneSpec(strategy=v.strategy, ratio=v.ratio, seed=v.seed,
                             threshold=v.threshold, mass=v.mass, marker=req.marker,
                             merge_runs=req.merge_runs)
            c = compress(steps, spec, token_entropies=entropies, token_offsets=offsets,
                         text=text, delimiter=delimiter)
            variants.append((c, v))
        answer_text = text[span[1]:]
        n_reasoning = sum(s.n_tokens for s in steps)
        out = schemas.TraceOut(
            sample=sample, completion=text, reasoning=reasoning, finish_reason=g.finish_reason,
            steps=[schemas.StepOut.from_step(s) for s in steps],
            variants=[self._variant_out(c, v, n_reasoning) for c, v in variants],
            answer_text=answer_text, extracted_answer=None, correct=None,
            completion_tokens=len(g.token_ids), reasoning_tokens=n_reasoning,
            entropy_total=float(sum(entropies)),
            tokens=schemas.TokenOut(ids=g.token_ids, entropies=entropies)
            if req.return_tokens else None,
        )
        return out, [(c, v) for c, v in variants]

    def _variant_out(self, c: Compressed, v: schemas.VariantSpec,
                     n_reasoning: int) -> schemas.VariantOut:
        after = len(self.encode(c.text)) if c.text else 0
        return schemas.VariantOut(
            strategy=v.strategy, ratio=v.ratio if v.strategy != "adaptive" else None,
            threshold=v.threshold, mass=v.mass, kept_steps=list(c.kept),
            skipped_steps=list(c.pruned), compressed_text=c.text, n_steps=c.n_steps,
            n_skipped=c.n_skipped, tokens_before=n_reasoning, tokens_after=after,
            reduction=(1.0 - after / n_reasoning) if n_reasoning else 0.0)

    async def _answer_variants(self, req, prompts, traces, golds, usage) -> None:
        jobs, slots = [], []
        for i, (trace, variants) in enumerate(traces):
            p_idx = i // req.sampling.n
            for v_idx, (c, _) in enumerate(variants):
                prompt = self.style.answer_prompt(prompts[p_idx], c.text)
                # A plain model states its answer on the cue's line; stop there.
                params = self.engine.sampling_params(
                    max_tokens=req.answer_max_tokens, temperature=0.0,
                    stop=None if self.style.thinking else ["\n"])
                jobs.append(self.engine.generate(self.encode(prompt), params, entropy=False))
                slots.append((trace, v_idx, golds[p_idx]))
        answers = await asyncio.gather(*jobs)
        for (trace, v_idx, gold), g in zip(slots, answers):
            out = trace.variants[v_idx]
            answer = g.text if self.style.thinking else f"{ANSWER_CUE}{g.text}"
            out.answer_text = g.text
            out.extracted_answer, out.correct = grading.grade(answer, gold)
            usage.answer_tokens += len(g.token_ids)

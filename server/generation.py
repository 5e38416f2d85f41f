"""OpenAI-style generation over the engine: n samples as n requests (each its own entropy
key), prompt-major choices, logprobs in vLLM's shapes, the `stepzip` extension, SSE.

HTTP-free: the routers in `server/routes/openai.py` call these.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.engine.engine import Engine, Generation
from server.errors import invalid
from stepzip.schemas.compress import StepOut
from stepzip.schemas.openai import ChoiceStepzip, StepzipOptions, _SamplingFields
from stepzip.steps import reasoning_span, segment, token_char_offsets
from stepzip.tokens import token_pieces
from server.weightgate import WeightGate
from stepzip.rewards import count_skips, skip_ratio


@dataclass
class Job:
    """One engine request: prompt `p`'s sample `k` -> choice index p * n + k."""

    index: int
    prompt: str | list[int]
    params: object
    entropy: bool


def sampling_kwargs(req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    sample: int) -> dict:
    """SamplingParams kwargs; sample k of a seeded request gets seed + k (else n equal ones)."""
    kw = dict(
        n=1,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed + sample,
        stop=req.stop_list(),
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=logprobs,
    )
    if req.logit_bias:
        try:  # JSON object keys are strings; vLLM wants token ids
            kw["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError as exc:
            raise invalid("logit_bias", "keys must be token ids") from exc
    return kw


def build_jobs(engine: Engine, prompts: list[str | list[int]], req: _SamplingFields, *,
               max_tokens: int | None, logprobs: int | None) -> list[Job]:
    """Validate lengths up front (422 naming the prompt) and make n jobs per prompt."""
    want_entropy = bool(req.stepzip and (req.stepzip.entropies or req.stepzip.steps))
    jobs = []
    for p_idx, prompt in enumerate(prompts):
        if isinstance(prompt, str):  # tokenize once, as vLLM would; the engine gets ids
            prompt = engine.tokenizer.encode(prompt)
        n_prompt = len(prompt)
        room = engine.max_model_len - n_prompt
        if room < 1:
            raise invalid(f"prompt.{p_idx}" if len(prompts) > 1 else "prompt",
                          f"{n_prompt} tokens leave no room within the model length "
                          f"({engine.max_model_len})")
        if max_tokens is not None and max_tokens > room:
            raise invalid("max_tokens", f"prompt {p_idx} has {n_prompt} tokens; {max_tokens} "
                          f"more exceed the model length ({engine.max_model_len})")
        for k in range(req.n):
            try:
                params = engine.sampling_params(**sampling_kwargs(
                    req, max_tokens=max_tokens or room, logprobs=logprobs, sample=k))
            except ValueError as exc:  # vLLM's own parameter checks
                raise invalid("sampling", str(exc)) from exc
            jobs.append(Job(p_idx * req.n + k, prompt, params, want_entropy))
    return jobs


async def run_jobs(engine: Engine, gate: WeightGate, jobs: list[Job]) -> list[Generation]:
    """Run all jobs concurrently under the weight gate; the first failure cancels the rest."""
    async with gate.generation():
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(engine.generate(j.prompt, j.params, entropy=j.entropy))
                     for j in jobs]
    return [t.result() for t in tasks]


def stepzip_fields(engine: Engine, opts: StepzipOptions | None, g: Generation,
                   default_delimiter: str) -> ChoiceStepzip | None:
    if opts is None:
        return None
    delimiter = opts.delimiter or default_delimiter
    pieces = token_pieces(lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True),
                          g.token_ids)
    text = "".join(pieces)
    out = ChoiceStepzip()
    if g.entropies is not None:
        out.entropy_total = float(math.fsum(g.entropies))
        if opts.entropies:
            out.entropies = g.entropies
    if text:
        start, end = reasoning_span(text)
        reasoning = text[start:end]
        out.n_skips = count_skips(text, marker=opts.marker)
        out.skip_ratio = skip_ratio(reasoning, out.n_skips, delimiter=delimiter,
                                    marker=opts.marker)
        steps = segment(text, token_char_offsets(pieces), g.entropies, delimiter=delimiter,
                        span=(start, end))
        out.n_steps = len(steps)
        if opts.steps:
            out.steps = [StepOut.from_step(s) for s in steps]
    return out


def token_str(engine: Engine, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else engine.tokenizer.decode([token_id])


def completion_logprobs(engine: Engine, g: Generation, as_ids: bool) -> dict | None:
    """vLLM's /v1/completions logprobs shape: tokens, token_logprobs, top_logprobs, offsets."""
    if g.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for token_id, position in zip(g.token_ids, g.logprobs):
        tokens.append(token_str(engine, token_id, as_ids))
        token_lps.append(_finite(position[token_id].logprob))
        tops.append({token_str(engine, tid, as_ids): _finite(lp.logprob)
                     for tid, lp in position.items()})
        offsets.append(offset)
        offset += len(engine.tokenizer.decode([token_id]))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(engine: Engine, g: Generation, top_n: int, as_ids: bool) -> dict | None:
    """OpenAI chat logprobs shape: content: [{token, logprob, bytes, top_logprobs}]."""
    if g.logprobs is None:
        return None
    content = []
    for token_id, position in zip(g.token_ids, g.logprobs):
        ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append({
            "token": token_str(engine, token_id, as_ids),
            "logprob": _finite(position[token_id].logprob),
            "bytes": list(engine.tokenizer.decode([token_id]).encode()),
            "top_logprobs": [{"token": token_str(engine, tid, as_ids),
                              "logprob": _finite(lp.logprob),
                              "bytes": list(engine.tokenizer.decode([tid]).encode())}
                             for tid, lp in ranked],
        })
    return {"content": content}


def _finite(value: float) -> float:
    # JSON has no -inf; vLLM's server writes -9999.0 for it.
    return value if math.isfinite(value) else -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


async def stream_jobs(engine: Engine, gate: WeightGate, jobs: list[Job]
                      ) -> AsyncIterator[tuple[Job, str, object, Generation | None]]:
    """Merge the jobs' output streams: yields (job, delta_text, output, final Generation or
    None). The final item of each job carries its Generation (entropies fetched)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        seen, request_id = 0, new_id("sz")
        final = None
        try:
            async for out in engine.stream(job.prompt, job.params, entropy=job.entropy,
                                           request_id=request_id):
                text = out.outputs[0].text
                await queue.put((job, text[seen:], out, None))
                seen = len(text)
                final = out
            comp = final.outputs[0]
            g = Generation(request_id, list(final.prompt_token_ids or []), list(comp.token_ids),
                           comp.text, comp.finish_reason, comp.stop_reason, logprobs=comp.logprobs)
            if job.entropy and engine.settings.entropy:
                g.entropies = await engine.entropies(request_id, len(g.token_ids))
            await queue.put((job, "", final, g))
        except BaseException as exc:
            await queue.put(exc)
            raise

    async with gate.generation():
        tasks = [asyncio.create_task(pump(j)) for j in jobs]
        try:
            remaining = len(jobs)
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item[3] is not None:
                    remaining -= 1
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"

"""The /v1/score service: existing reasoning through the /v1/compress pipeline.

Each pair's reasoning (its token ids, or its text encoded by the model's tokenizer) is
scored after the prompt /v1/compress renders for its problem by `Engine.score`: one
prefill pass (server/engine/prefill.py), or teacher forcing (server/engine/forcing.py)
where the runner cannot prefill-score. `Compressor.run` does the rest, so entropies,
steps, variants and answers come from one code path.
"""

from __future__ import annotations

from server.errors import invalid
from server.services.compress import Compressor, Prepared
from stepzip.schemas.compress import CompressRequest
from stepzip.schemas.score import ScoreRequest, ScoreResponse


class Scorer:
    def __init__(self, compressor: Compressor):
        self.compressor = compressor
        self.engine = compressor.engine

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        """POST /v1/score: validate (4xx before any engine work), admit, run."""
        self.compressor.require_entropy()
        compress_req = req.to_compress()
        forced, prepared = await self.engine.in_tokenizer_thread(
            self.prepare, req, compress_req)
        with self.engine.admission(prepared.engine_requests):
            async with self.compressor.gate.generation():
                out = await self.compressor.run(compress_req, forced=forced,
                                                prepared=prepared)
        if self.compressor.metrics is not None:
            self.compressor.metrics.observe_compress(out)
        for problem in out.results:
            for trace in problem.traces:
                trace.finish_reason = None  # given, not generated
        return ScoreResponse(**dict(out))

    def prepare(self, req: ScoreRequest,
                compress_req: CompressRequest) -> tuple[list[list[int]], Prepared]:
        """Each pair's token ids, and the rendered prompts, after checking everything the
        engine would refuse. CPU-bound (tokenizing): run in the tokenizer thread."""
        settings, limit = self.engine.settings, self.engine.max_model_len
        if len(req.pairs) > settings.max_problems:
            raise invalid("pairs", f"at most {settings.max_problems} pairs per request, "
                                   f"got {len(req.pairs)}")
        if req.step_score == "sampled" and self.engine.scoring != "prefill":
            # Forcing sets the given token's logit to 1e30 before vLLM takes logprobs,
            # so every logprob would read 0 (every step score 0).
            raise invalid("step_score", "'sampled' needs each given token's logprob, which "
                          "this server cannot compute: it scores by teacher forcing "
                          f"({self.engine.scoring_reason}); use 'sum' or 'mean'")
        prompts, prompt_ids = self.compressor.render(compress_req)
        # Answering feeds prompt + (compressed) reasoning + the answer cue back in.
        answer = (len(self.compressor.encode(self.compressor.style.answer_prompt("", "")))
                  + req.answer_max_tokens if req.answer else 0)
        vocab = len(self.engine.tokenizer)
        forced = []
        for i, pair in enumerate(req.pairs):
            if pair.reasoning_ids is not None:
                field, ids = f"pairs.{i}.reasoning_ids", pair.reasoning_ids
                if (bad := max(ids)) >= vocab:
                    raise invalid(field, f"token id {bad} is outside the model's vocabulary "
                                         f"(0..{vocab - 1})")
            else:
                field, ids = f"pairs.{i}.reasoning", self.compressor.encode(pair.reasoning)
            size = f"prompt ({len(prompt_ids[i])} tokens) + reasoning ({len(ids)} tokens)"
            need = len(prompt_ids[i]) + len(ids)
            if need > limit:
                raise invalid(field, f"{size} exceeds the model length ({limit})")
            if need + answer > limit:
                raise invalid(field, f"{size} + answer cue and answer_max_tokens ({answer} "
                                     f"tokens) exceed the model length ({limit})")
            forced.append(ids)
        needed = len(req.pairs) * (len(req.variants) if req.answer else 1)
        if needed > settings.max_pending_requests:
            raise invalid("pairs", f"this request needs {needed} engine requests at once "
                                   f"(pairs x variants when answering), above the server's "
                                   f"limit of {settings.max_pending_requests}; split it")
        return forced, Prepared(prompts, prompt_ids, needed)

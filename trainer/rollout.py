"""GRPO rollouts from the stepzip server: TRL's ``rollout_func`` over ``/v1/completions``,
and the per-step timings it shares with the callbacks."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clients.client import StepzipClient
from stepzip.rewards import RewardConfig
from trainer.config import GrpoRunConfig


@dataclass
class StepTimes:
    """What one optimizer step spent, filled by the rollout function and the callbacks."""

    rollout_s: float = 0.0
    rollout_requests: int = 0
    rollout_completion_tokens: int = 0
    server_skip_ratio: list[float] = field(default_factory=list)
    step_s: float | None = None
    sync_s: float | None = None
    sync_save_s: float | None = None
    sync_load_s: float | None = None
    sync_server_s: float | None = None
    version_before: str | None = None
    version_after: str | None = None
    checksum: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("lock", "server_skip_ratio")}
        if self.server_skip_ratio:
            out["server_skip_ratio"] = sum(self.server_skip_ratio) / len(self.server_skip_ratio)
        return out

    def reset(self) -> None:
        fresh = StepTimes()
        for f in dataclasses.fields(self):
            if f.name != "lock":
                setattr(self, f.name, getattr(fresh, f.name))


def group_prompts(prompts: Sequence[Any], k: int) -> tuple[list[Any], int]:
    """(distinct prompts, n): TRL hands the rollout function each prompt repeated K times
    in a row (its RepeatSampler); ask once with n=K then. Anything else is asked as is."""
    if k > 1 and len(prompts) % k == 0 and all(
            prompts[i] == prompts[i - i % k] for i in range(len(prompts))):
        return list(prompts[::k]), k
    return list(prompts), 1


class ServerRollout:
    """TRL ``rollout_func``: completions from ``/v1/completions`` of the stepzip server.

    Returns ``prompt_ids``, ``completion_ids``, ``logprobs`` (the sampled tokens', from
    the engine) and, for the reward functions, ``server_skip_ratio``, ``server_n_skips``,
    ``server_n_steps`` and ``finish_reason`` per completion.
    """

    def __init__(self, client: StepzipClient, tokenizer: Any, cfg: GrpoRunConfig,
                 reward: RewardConfig, times: StepTimes):
        self.client, self.tokenizer, self.cfg = client, tokenizer, cfg
        self.reward, self.times = reward, times

    def encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.apply_chat_template(prompt, tokenize=True,
                                                      add_generation_prompt=True,
                                                      return_dict=False)
        if isinstance(prompt, list):  # token ids already
            return [int(t) for t in prompt]
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def body(self, prompt_ids: list[list[int]], n: int, max_tokens: int) -> dict:
        cfg = self.cfg
        body: dict[str, Any] = {
            "prompt": prompt_ids, "n": n, "max_tokens": max_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
            "repetition_penalty": cfg.repetition_penalty, "logprobs": 0,
            "return_token_ids": True, "stream": False,
            "stepzip": {"entropies": False, "steps": False,
                        "delimiter": self.reward.step_delimiter, "marker": self.reward.marker},
        }
        if cfg.min_p is not None:
            body["min_p"] = cfg.min_p
        return body

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        started = time.perf_counter()
        training = getattr(getattr(trainer, "model", None), "training", True)
        k = trainer.num_generations if training else trainer.num_generations_eval
        max_tokens = getattr(trainer, "max_completion_length", None) or \
            self.cfg.max_completion_length
        distinct, n = group_prompts(prompts, k)
        ids = [self.encode(p) for p in distinct]
        chunk = max(1, self.cfg.request_prompts)
        chunks = [list(range(i, min(i + chunk, len(ids)))) for i in range(0, len(ids), chunk)]

        def ask(indices: list[int]) -> list[dict]:
            response = self.client.completions(self.body([ids[i] for i in indices], n,
                                                         max_tokens))
            choices = sorted(response["choices"], key=lambda c: c["index"])
            if len(choices) != len(indices) * n:
                raise RuntimeError(f"server returned {len(choices)} choices for "
                                   f"{len(indices)} prompts x n={n}")
            return choices

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            answers = list(pool.map(ask, chunks))
        out = self.collect([c for part in answers for c in part], ids, n)
        elapsed = time.perf_counter() - started
        with self.times.lock:
            self.times.rollout_s += elapsed
            self.times.rollout_requests += len(chunks)
            self.times.rollout_completion_tokens += sum(len(c) for c in out["completion_ids"])
            self.times.server_skip_ratio.extend(out["server_skip_ratio"])
        return out

    def collect(self, choices: list[dict], ids: list[list[int]], n: int) -> dict[str, list]:
        """TRL's rollout dict from the server's choices (prompt-major, n per prompt)."""
        eos = self.tokenizer.eos_token_id
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [],
                                "server_skip_ratio": [], "server_n_skips": [],
                                "server_n_steps": [], "finish_reason": []}
        have_logprobs = True
        for j, choice in enumerate(choices):
            completion = list(choice.get("token_ids") or [])
            lps = (choice.get("logprobs") or {}).get("token_logprobs")
            if not completion:  # TRL reads ids[-1]; an empty completion ended at once
                completion, lps = [eos], [None]
            if lps is None or len(lps) != len(completion):
                have_logprobs = False
            stepzip = choice.get("stepzip") or {}
            out["prompt_ids"].append(ids[j // n])
            out["completion_ids"].append(completion)
            out["logprobs"].append(lps)
            out["server_skip_ratio"].append(float(stepzip.get("skip_ratio", 0.0)))
            out["server_n_skips"].append(int(stepzip.get("n_skips", 0)))
            out["server_n_steps"].append(int(stepzip.get("n_steps", 0)))
            out["finish_reason"].append(choice.get("finish_reason"))
        if not have_logprobs:
            out["logprobs"] = None  # type: ignore[assignment]
        return out

"""The GRPO reward functions TRL calls: stepzip.rewards' components, the first of them
also logging per-batch diagnostics (skip ratio, skips, steps, accuracy, closed
reasoning) through TRL's ``log_metric``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stepzip.grader import grade
from stepzip.rewards import (
    RewardConfig,
    completion_text,
    count_skips,
    count_steps,
    make_trl_reward_funcs,
    skip_ratio,
    skip_token_id_of,
    split_completion,
)


def completion_diagnostics(completions: Sequence[Any], completion_ids: Sequence[Any] | None,
                           golds: Sequence[str | None] | None, cfg: RewardConfig,
                           skip_id: int | None,
                           decode: Callable[[list[int]], str] | None = None) -> dict[str, float]:
    """Means over a batch: skip ratio, skips, steps, accuracy, closed reasoning; skips
    and steps counted in the reasoning, as the reward counts them."""
    ids = completion_ids if completion_ids is not None else [None] * len(completions)
    golds = golds if golds is not None else [None] * len(completions)
    ratios, skips, steps, correct, closed, ungradable = [], [], [], [], [], []
    for c, i, gold in zip(completions, ids, golds, strict=True):
        text = completion_text(c)
        n_skips = count_skips(text, i, skip_id, cfg.marker, think_close=cfg.think_close,
                              decode=decode)
        reasoning, answer = split_completion(text, cfg.think_close)
        ratios.append(skip_ratio(reasoning, n_skips, cfg.step_delimiter, cfg.marker))
        skips.append(n_skips)
        steps.append(count_steps(reasoning.replace(cfg.marker, ""), cfg.step_delimiter)
                     + n_skips)
        closed.append(answer is not None)
        # The reward's own grading, memoised by the grader: no second deadline is paid.
        outcome = grade(answer, gold).outcome if answer is not None and gold is not None \
            else None
        correct.append(outcome == "correct")
        ungradable.append(outcome == "ungradable")
    n = max(1, len(completions))
    return {"stepzip/skip_ratio": sum(ratios) / n, "stepzip/skips": sum(skips) / n,
            "stepzip/steps": sum(steps) / n, "stepzip/accuracy": sum(correct) / n,
            "stepzip/closed_reasoning": sum(closed) / n,
            "stepzip/ungradable": sum(ungradable) / n}


def make_reward_funcs(cfg: RewardConfig, tokenizer: Any = None) -> list[Callable[..., list]]:
    """stepzip.rewards' component functions; the first also logs the diagnostics."""
    funcs = make_trl_reward_funcs(cfg, tokenizer)
    if not funcs:
        raise ValueError("every reward component is switched off; GRPO needs a reward")
    skip_id = skip_token_id_of(tokenizer, cfg.marker)
    decode = None if tokenizer is None else (
        lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    first = funcs[0]

    def with_diagnostics(prompts, completions, completion_ids=None, **kwargs):
        rewards = first(prompts, completions, completion_ids=completion_ids, **kwargs)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for name, value in completion_diagnostics(
                    completions, completion_ids, kwargs.get("answer"), cfg, skip_id,
                    decode).items():
                log_metric(name, value)
            server_ratio = kwargs.get("server_skip_ratio")
            if server_ratio:
                log_metric("stepzip/server_skip_ratio", sum(server_ratio) / len(server_ratio))
        return rewards

    with_diagnostics.__name__ = with_diagnostics.__qualname__ = first.__name__
    return [with_diagnostics, *funcs[1:]]

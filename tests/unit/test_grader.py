"""Bounded grading (stepzip.grader): no answer string, in the gold, in the model's answer
or in both, makes grading run past its deadline; a deadline hit is the `ungradable`
outcome. Every case of the corpus ran > 8 s (no end seen) through the in-process
`stepzip.grading` this module replaces (math-verify with its timeouts off)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from stepzip import grader
from stepzip.grader import Grader, GradingFailed, GradingTimeout

DEADLINE = 1.0
SLACK = 1.0  # the acceptance: every case returns within deadline + 1 s

# Each of these made math-verify/sympy run for > 8 s (no end seen) against "7" in either
# position, except the long garbage, which is cheap but must stay so.
HOSTILE = [
    "9^{9^{9}}", "10^{10^{10^{10}}}", "2^{2^{2^{2^{2^{2}}}}}", "99999999999^{99999999999}",
    "10^{10^{8}}", "(10^{10})!", "((100)!)!", "\\binom{10^{12}}{10^{6}}", "(x+1)^{10^{6}}",
    "\\sum_{k=1}^{10^{12}} k^{k}", "\\prod_{k=1}^{10^{9}} k", "\\int_0^1 e^{x^{10^6}} dx",
    "\\frac{1}{" * 300 + "2" + "}" * 300, "\\sqrt{" * 400 + "2" + "}" * 400,
    "x" * 50_000, "(" * 5_000,
]


@pytest.fixture(scope="module")
def pool():
    g = Grader(workers=2, timeout=DEADLINE)
    assert g.wait_ready()  # a server starts its pool with the engine; the deadline is
    yield g                # for grading, not for an interpreter's start-up
    g.close()


def timed(fn, *args):
    started = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - started


@pytest.mark.parametrize("position", ["gold", "answer", "both"])
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda s: s[:24])
def test_hostile_answers_end_within_the_deadline(pool, hostile, position):
    gold = {"gold": hostile, "answer": "7", "both": hostile}[position]
    answer = {"gold": "7", "answer": hostile, "both": hostile}[position]
    g, took = timed(pool.grade, f"so the result is \\boxed{{{answer}}}", gold)
    assert took <= DEADLINE + SLACK, f"{took:.2f} s"
    assert g.outcome in ("ungradable", "wrong", "correct")
    if g.outcome == "ungradable":
        assert g.correct is None and "deadline" in g.reason


def test_plain_answers_still_grade(pool):
    assert pool.grade("the answer is \\frac{1}{2}.", "0.5").outcome == "correct"
    assert pool.grade("#### 18 dollars", "18").as_pair == ("18 dollars", True)
    g = pool.grade("so \\boxed{19}", "18")
    assert (g.outcome, g.correct, g.reason) == ("wrong", False, None)
    assert pool.grade("no number here", "3").outcome == "wrong"
    assert pool.grade("\\boxed{4}", None) == grader.Grade("4", None, "no_gold")
    assert pool.match("2,000", "2000").outcome == "correct"


def test_a_hostile_gold_costs_a_few_deadlines_not_one_per_sample(pool):
    """14 samples against one power-tower gold: after it has run out of time against
    two answers, the rest are ungradable at once."""
    started = time.monotonic()
    grades = pool.grade_many([(f"\\boxed{{{i}}}", "3^{3^{3^{3}}}") for i in range(14)])
    took = time.monotonic() - started
    assert {g.outcome for g in grades} == {"ungradable"}
    assert took <= 3 * (DEADLINE + SLACK), f"{took:.2f} s for 14 samples"
    # The answers it was compared with are not blamed.
    assert pool.grade("\\boxed{1}", "1").outcome == "correct"


def test_a_child_that_ignores_the_soft_deadline_is_killed_and_replaced():
    """Code that SIGALRM does not reach (here: a child told to ignore it) is killed by
    the parent at the deadline, and another child takes its place."""
    import signal

    g = Grader(workers=1, timeout=DEADLINE)
    try:
        assert g.wait_ready()
        with pytest.raises(RuntimeError, match="cannot be sent back"):  # the old handler
            g.call(signal.signal, signal.SIGALRM, signal.SIG_IGN)
        with pytest.raises(GradingTimeout, match="killed"):
            g.call(time.sleep, 30, timeout=0.3)
        assert g.counts["restarts"] == 1
        assert g.grade("\\boxed{5}", "5").outcome == "correct"  # the replacement grades
    finally:
        g.close()


def test_a_soft_deadline_interrupts_python_code_without_a_kill(pool):
    before = pool.counts["restarts"]
    with pytest.raises(GradingTimeout):
        pool.call(time.sleep, 30, timeout=0.3)
    assert pool.counts["restarts"] == before


def test_memory_blowup_is_a_failure_not_a_dead_machine(pool):
    with pytest.raises(GradingFailed, match="memory"):
        pool.call(bytearray, 64 * 2**30)


def test_errors_in_the_called_function_reach_the_caller(pool):
    with pytest.raises(ValueError):
        pool.call(int, "not a number")


def test_the_event_loop_keeps_running_while_grading(pool):
    async def main():
        gaps, stop = [], asyncio.Event()

        async def heartbeat():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        grades = await pool.agrade_many([("\\boxed{7}", "5^{5^{5^{5}}}"),
                                         ("\\boxed{7}", "7")])
        stop.set()
        await beat
        return grades, max(gaps)

    grades, worst_gap = asyncio.run(main())
    assert [g.outcome for g in grades] == ["ungradable", "correct"]
    assert worst_gap < 0.25, f"the loop stalled {worst_gap:.2f} s"


def test_close_stops_every_child():
    g = Grader(workers=2, timeout=DEADLINE).start()
    assert g.grade("\\boxed{2}", "2").outcome == "correct"
    children = [c.process for c in g._running]
    assert children
    g.close()
    deadline = time.monotonic() + 10
    while any(p.poll() is None for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.poll() is not None for p in children)
    with pytest.raises(GradingFailed):
        g.call(int, "1")


def test_rewards_and_eval_grade_through_the_bounded_grader():
    """The GRPO correctness reward and the eval harness: a policy's power tower is worth
    nothing and costs at most the deadline."""
    from clients.eval import graded
    from stepzip.rewards import RewardConfig, correctness_reward
    from trainer.rewards import completion_diagnostics

    assert grader.configure(timeout=DEADLINE).wait_ready()
    cfg = RewardConfig()
    completion = f"some reasoning{cfg.think_close}so \\boxed{{9^{{9^{{9}}}}}}"
    reward, took = timed(correctness_reward, completion, "7", cfg)
    assert reward == 0.0 and took <= DEADLINE + SLACK
    assert correctness_reward(f"r{cfg.think_close}\\boxed{{7}}", "7", cfg) == cfg.correct_reward
    stats = completion_diagnostics([completion], None, ["7"], cfg, None)
    assert stats["stepzip/ungradable"] == 1.0 and stats["stepzip/accuracy"] == 0.0
    g, took = timed(graded, "\\boxed{7}", "6^{6^{6^{6}}}", True)
    assert g.outcome == "ungradable" and took <= DEADLINE + SLACK


# Modules whose math-verify functions run only in the grader's children: grading.py's
# through Grader.grade/match, papercode.py's `parsed_answer_matches` through grader.call.
MATH_VERIFY_MODULES = ("stepzip/grading.py", "stepzip/papercode.py")


def test_the_trl_correctness_reward_grades_a_batch_concurrently():
    """K=14 completions against one hostile gold: a few deadlines, not fourteen."""
    from stepzip.rewards import RewardConfig, make_trl_reward_funcs

    assert grader.configure(timeout=DEADLINE).wait_ready()
    cfg = RewardConfig()
    correctness = make_trl_reward_funcs(cfg)[0]
    assert correctness.__name__ == "correctness"
    completions = [f"r{cfg.think_close}so \\boxed{{{i}}}" for i in range(14)]
    rewards, took = timed(lambda: correctness([""] * 14, completions,
                                              answer=["4^{4^{4^{4}}}"] * 13 + ["13"]))
    assert rewards == [0.0] * 13 + [cfg.correct_reward]
    assert took <= 3 * (DEADLINE + SLACK), f"{took:.2f} s"


def test_nothing_grades_outside_the_grader():
    """math-verify is imported by the grading modules alone, and their unbounded matching
    functions are called by stepzip/grader.py alone (which runs them in children)."""
    root = Path(__file__).resolve().parents[2]
    unbounded = re.compile(r"\b(grading\.(grade|answers_match|_parse|extract_answer)\(|"
                           r"from stepzip\.grading import[^\n]*\b(grade|answers_match)\b)")
    offenders = []
    for package in ("stepzip", "server", "trainer", "clients"):
        for path in (root / package).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            text = path.read_text(encoding="utf-8")
            if rel not in MATH_VERIFY_MODULES and re.search(r"^\s*(from|import) math_verify",
                                                        text, re.MULTILINE):
                offenders.append(f"{rel} imports math_verify")
            if rel not in ("stepzip/grading.py", "stepzip/grader.py") and unbounded.search(text):
                offenders.append(f"{rel} grades in-process")
    assert not offenders, offenders

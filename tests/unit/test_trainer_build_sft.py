"""build-sft without a server: pair selection, completion format, the resumable store."""

from __future__ import annotations

import json
import threading

import pytest

from clients.client import StepzipError
from stepzip.data import Problem
from stepzip.schemas import compress as schemas
from trainer.build_sft import (
    JsonlLog,
    answer_line,
    build_sft,
    format_completion,
    pairs_from_result,
    sidecar,
    within_length,
)
from trainer.config import BuildSftConfig

PLAIN_PROMPT = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
THINK_PROMPT = "<|user|>Q<|assistant|><think>\n"


def _variant(correct=True, text="Step 1.\n[SKIP]\n[SKIP]\n", n_steps=3, answer=" 7."):
    return {"strategy": "low", "ratio": 0.8, "kept_steps": [0], "skipped_steps": [1, 2],
            "compressed_text": text, "n_steps": n_steps, "n_skipped": 2,
            "tokens_before": 30, "tokens_after": 12, "reduction": 0.6,
            "answer_text": answer, "extracted_answer": "7" if correct else "3",
            "correct": correct}


def _result(pid, correct=True, prompt=PLAIN_PROMPT, **variant):
    return {"id": pid, "prompt": prompt, "gold": "7", "traces": [{
        "sample": 0, "completion": "...", "reasoning": "...", "finish_reason": "length",
        "steps": [], "variants": [_variant(correct, **variant)], "answer_text": "",
        "extracted_answer": None, "correct": False, "completion_tokens": 30,
        "reasoning_tokens": 30, "entropy_total": 1.0}]}


def test_completion_format_closes_reasoning_then_answers() -> None:
    assert format_completion("a\n[SKIP]\n", "The answer is 7.") == \
        "a\n[SKIP]\n</think>\n\nThe answer is 7."


def test_answer_line_plain_thinking_and_gold() -> None:
    assert answer_line(" 7.", thinking=False, gold="7", answer_from="model") == \
        "The answer is 7."
    assert answer_line("\\boxed{7}\n", thinking=True, gold="7", answer_from="model") == \
        "\\boxed{7}"
    assert answer_line("", thinking=False, gold="7", answer_from="model") is None
    assert answer_line(" 3.", thinking=False, gold="7", answer_from="gold") == \
        "The answer is 7."


def test_keep_correct_drops_wrong_answers_keep_all_keeps_them() -> None:
    cfg = BuildSftConfig(keep="correct")
    rows, reason = pairs_from_result(_result("p1", correct=False), cfg, "\n", "Q", "gsm8k")
    assert rows == [] and reason == "incorrect"
    rows, reason = pairs_from_result(_result("p1", correct=False),
                                     BuildSftConfig(keep="all"), "\n", "Q", "gsm8k")
    assert reason is None and len(rows) == 1
    row = rows[0]
    assert row["prompt"] == PLAIN_PROMPT
    assert row["completion"] == "Step 1.\n[SKIP]\n[SKIP]\n</think>\n\nThe answer is 7."
    assert row["delimiter"] == "\n" and row["reduction"] == 0.6 and row["id"] == "p1"


def test_empty_compression_is_dropped() -> None:
    rows, reason = pairs_from_result(_result("p", text="", n_steps=0),
                                     BuildSftConfig(keep="all"), "\n", "Q", "gsm8k")
    assert rows == [] and reason == "empty"


def test_cut_off_answer_is_dropped_not_a_target() -> None:
    result = _result("p", answer=" 7 because 3 + 4 = 7 and then")
    result["traces"][0]["variants"][0]["answer_finish_reason"] = "length"
    rows, reason = pairs_from_result(result, BuildSftConfig(keep="all"), "\n", "Q", "x")
    assert rows == [] and reason == "answer-cut-off"
    gold = pairs_from_result(result, BuildSftConfig(keep="all", answer_from="gold"), "\n",
                             "Q", "x")[0]
    assert len(gold) == 1  # the gold answer is written in full whatever the model did


def test_over_long_pairs_are_dropped_whole(smollm2_tokenizer) -> None:
    def count(text: str) -> int:
        return len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"])

    short = {"prompt": PLAIN_PROMPT, "completion": "a\n</think>\n\nThe answer is 7."}
    long = {"prompt": PLAIN_PROMPT, "completion": "word " * 500 + "\n</think>\n\n7"}
    fits = count(short["prompt"]) + count(short["completion"]) + 1
    kept, dropped = within_length([short, long], count, fits)
    assert kept == [short] and dropped == 1
    assert within_length([short], count, fits - 1) == ([], 1)


def test_thinking_prompt_uses_the_answer_as_written() -> None:
    rows, _ = pairs_from_result(_result("p", prompt=THINK_PROMPT, answer="It is 7."),
                                BuildSftConfig(), "\n\n", "Q", "x")
    assert rows[0]["completion"].endswith("</think>\n\nIt is 7.")
    assert rows[0]["thinking"] is True


def test_torn_tail_is_cut_on_open(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    log = JsonlLog(path)
    assert log.repaired_bytes == len('{"a": ')
    assert log.read() == [{"a": 1}, {"a": 2}]
    log.append([{"a": 3}])
    assert [r["a"] for r in log.read()] == [1, 2, 3]


def test_garbage_last_line_with_newline_is_cut(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a"\n')
    assert JsonlLog(path).read() == [{"a": 1}]


class FakeCompressClient:
    """Answers like /v1/compress: problem ids ending in an odd digit are correct."""

    def __init__(self, fail_ids=()):
        self.fail_ids = set(fail_ids)
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def compress_request(self, request: schemas.CompressRequest) -> schemas.CompressResponse:
        ids = [p.id for p in request.problems]
        with self.lock:
            self.seen += ids
        if self.fail_ids & set(ids):
            raise StepzipError(400, {"error": "bad batch"})
        assert request.variants[0].ratio == 0.8 and request.marker == "[SKIP]"
        results = [_result(pid, correct=int(pid[-1]) % 2 == 1) for pid in ids]
        return schemas.CompressResponse.model_validate({
            "model": "m", "delimiter": "\n", "results": results, "usage": {}, "timings": {}})

    def close(self) -> None:
        pass


def _problems(n):
    return [Problem(id=f"p{i}", question=f"Q{i}", answer="7", source="t") for i in range(n)]


def test_build_keeps_correct_pairs_and_writes_summary(tmp_path) -> None:
    out = tmp_path / "sft.jsonl"
    cfg = BuildSftConfig(output=str(out), batch_size=3, concurrency=2, progress=False)
    stats = build_sft(cfg, client=FakeCompressClient(), problems=_problems(8), log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["p1", "p3", "p5", "p7"]
    assert stats.kept == 4 and stats.dropped == 4 and stats.processed == 8
    assert stats.mean_reduction_kept == pytest.approx(0.6)
    assert stats.dropped_by_reason == {"incorrect": 4}
    summary = json.loads(sidecar(out, "summary.json").read_text())
    assert summary["stats"]["kept_total"] == 4
    assert len(sidecar(out, "dropped.jsonl").read_text().splitlines()) == 4


def test_rerun_skips_finished_ids_and_neither_loses_nor_duplicates(tmp_path) -> None:
    out = tmp_path / "sft.jsonl"
    cfg = BuildSftConfig(output=str(out), batch_size=2, concurrency=1, keep="all",
                         progress=False)
    # First run: the batch holding p2 fails; everything else is written.
    first = FakeCompressClient(fail_ids={"p2"})
    stats = build_sft(cfg, client=first, problems=_problems(6), log=lambda m: None)
    assert stats.failed_batches == 1 and stats.kept == 4
    # Simulate a crash mid-append: a torn half line at the end.
    with out.open("a") as f:
        f.write('{"id": "p9", "prob')
    second = FakeCompressClient()
    stats = build_sft(cfg, client=second, problems=_problems(6), log=lambda m: None)
    assert sorted(second.seen) == ["p2", "p3"]  # only the failed batch is asked again
    assert stats.already_done == 4 and stats.kept == 2 and stats.repaired_bytes > 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == [f"p{i}" for i in range(6)]
    third = FakeCompressClient()
    stats = build_sft(cfg, client=third, problems=_problems(6), log=lambda m: None)
    assert third.seen == [] and stats.kept_total == 6


def test_dropped_problems_are_not_asked_again(tmp_path) -> None:
    out = tmp_path / "sft.jsonl"
    cfg = BuildSftConfig(output=str(out), batch_size=4, progress=False)
    build_sft(cfg, client=FakeCompressClient(), problems=_problems(4), log=lambda m: None)
    again = FakeCompressClient()
    build_sft(cfg, client=again, problems=_problems(4), log=lambda m: None)
    assert again.seen == []

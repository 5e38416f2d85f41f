"""Hugging Face datasets in and out, without a server or the network: parquet, csv and
`save_to_disk` folders as --dataset (with --question-field/--answer-field) through
`stepzip eval` and `build-sft`; build-sft's dataset folder in TRL's conversational
prompt-completion format, taken by SFTTrainer and `stepzip train sft` as it is."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from test_eval import FakeServer as FakeEvalServer
from test_trainer_build_sft import FakeCompressClient

from clients.cli import build_parser
from clients.eval import RESULTS, SUMMARY, config_from_args, run_eval
from stepzip.data import load_problems
from trainer.build_sft import build_sft, sidecar
from trainer.config import BuildSftConfig, from_args

ROWS = [{"Problem": f"Tom has {i} apples and buys {14 - i} more. How many?",
         "Solution": "#### 14" if i % 2 else "14", "level": i} for i in range(5)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub: a Hub id must fail with one clear message, never reach the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "apples.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.fixture
def arrow_dir(tmp_path):
    """A save_to_disk folder with two splits and the usual column names."""
    rows = [{"question": r["Problem"], "answer": r["Solution"], "id": f"a{i}"}
            for i, r in enumerate(ROWS)]
    folder = tmp_path / "apples-arrow"
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:2]),
                         test=datasets.Dataset.from_list(rows[2:])).save_to_disk(str(folder))
    return folder


def test_parquet_csv_and_arrow_folders_load_with_field_mapping(tmp_path, parquet,
                                                               arrow_dir) -> None:
    problems = load_problems(str(parquet), question_field="Problem", answer_field="Solution")
    assert [p.answer for p in problems] == ["14"] * 5  # GSM8K-style "#### 14" -> 14
    assert problems[0].id == "apples-test-0" and problems[0].question == ROWS[0]["Problem"]
    csv = tmp_path / "apples.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(csv))
    assert load_problems(str(csv), question_field="Problem", answer_field="Solution",
                         limit=2, offset=1) == problems[1:3]
    test = load_problems(str(arrow_dir), "test")
    assert [p.id for p in test] == ["a2", "a3", "a4"]  # the split asked for, its ids
    assert [p.id for p in load_problems(str(arrow_dir), "train")] == ["a0", "a1"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_problems(str(arrow_dir), "dev")


def test_missing_columns_and_hub_ids_offline_are_named(parquet) -> None:
    with pytest.raises(ValueError, match=r"question_field: .* no column 'problem' or "
                                         r"'question'.*Problem"):
        load_problems(str(parquet))
    with pytest.raises(ValueError, match="answer_field: .* no column 'gold'"):
        load_problems(str(parquet), question_field="Problem", answer_field="gold")
    # Without an answer column and none asked for: problems without gold.
    assert load_problems(str(parquet), question_field="Problem")[0].answer is None
    with pytest.raises(ValueError, match="nobody/nothing: cannot load it as a Hugging Face"):
        load_problems("nobody/nothing")


@pytest.mark.parametrize("source", ["parquet", "arrow"])
def test_eval_runs_on_a_hugging_face_dataset(tmp_path, parquet, arrow_dir, source) -> None:
    flags = (["--dataset", str(parquet), "--question-field", "Problem", "--answer-field",
              "Solution"] if source == "parquet" else ["--dataset", str(arrow_dir)])
    args = build_parser().parse_args([
        "eval", *flags, "--output", str(tmp_path / "out"), "--ratios", "0,0.5,1",
        "--strategies", "low,high", "--bootstrap", "100", "--no-progress"])
    server = FakeEvalServer()
    lines: list[str] = []
    summary = run_eval(config_from_args(args), server, log=lines.append)
    expected = 5 if source == "parquet" else 3  # the arrow folder's test split
    assert summary["n_problems"] == expected and len(server.compress_calls) == expected
    assert summary["full_accuracy"] == 1.0  # every gold is 14, as the fake answers
    rows = [json.loads(x) for x in (tmp_path / "out" / RESULTS).read_text().splitlines()]
    assert {r["gold"] for r in rows} == {"14"}
    assert (tmp_path / "out" / SUMMARY).is_file()
    timing = next(line for line in lines if line.startswith("eval: time:"))
    assert "wall" in timing and f"summed over {2 * expected} requests" in timing


@pytest.mark.parametrize("source", ["parquet", "arrow"])
def test_build_sft_reads_a_hugging_face_dataset_and_writes_one(tmp_path, parquet, arrow_dir,
                                                               source) -> None:
    out = tmp_path / "pairs.jsonl"
    flags = (["--dataset", str(parquet), "--question-field", "Problem", "--answer-field",
              "Solution"] if source == "parquet" else ["--dataset", str(arrow_dir)])
    args = build_parser().parse_args(["train", "build-sft", *flags, "--split", "test",
                                      "--output", str(out), "--keep", "all", "--no-progress"])
    cfg = from_args(BuildSftConfig, args)
    build_sft(cfg, client=FakeCompressClient(), log=lambda m: None)
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    folder = sidecar(out, "dataset")
    data = datasets.load_from_disk(str(folder))
    assert len(data) == len(pairs) == (5 if source == "parquet" else 3)
    row = data[0]
    # TRL's conversational prompt-completion format: lists of messages.
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert pairs[0]["question"] in row["prompt"][0]["content"]
    assert row["completion"] == [{"role": "assistant", "content": pairs[0]["completion"]}]
    assert row["marker"] == "[SKIP]" and row["delimiter"] == "\n"


def test_sft_trainer_takes_build_sfts_folder_as_it_is(tmp_path, default_model_dir) -> None:
    """SFTTrainer on load_from_disk(folder) with no reshaping: the prompt is masked and
    the completion is the assistant's message; `stepzip train sft` trains from it."""
    pytest.importorskip("trl")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from trainer.config import SftRunConfig
    from trainer.modeling import META_FILE, add_skip_token
    from trainer.sft import run_sft

    problems = [f"What is {i} + 1?" for i in range(4)]
    out = tmp_path / "pairs.jsonl"
    from stepzip.data import Problem

    build_sft(BuildSftConfig(output=str(out), keep="all", progress=False),
              client=FakeCompressClient(),
              problems=[Problem(f"p{i}", q, "7", "t") for i, q in enumerate(problems)],
              log=lambda m: None)
    folder = sidecar(out, "dataset")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    add_skip_token(tok, model, "[SKIP]")
    trainer = SFTTrainer(model=model, processing_class=tok,
                         train_dataset=datasets.load_from_disk(str(folder)),
                         args=SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True,
                                        bf16=False, report_to="none", max_steps=1))
    example = trainer.train_dataset[0]
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    first = datasets.load_from_disk(str(folder))[0]
    assert first["completion"][0]["content"] in tok.decode(trained)
    assert first["prompt"][0]["content"] not in tok.decode(trained)

    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(base)
    run_sft(SftRunConfig(model=str(base), data=str(folder), output_dir=str(tmp_path / "sft"),
                         max_steps=1, batch_size=2, grad_accum=1, dtype="float32",
                         max_length=512, plot=False), log=lambda m: None)
    meta = json.loads((tmp_path / "sft" / META_FILE).read_text())
    assert meta["steps"] == 1 and meta["pairs"] == 4 and meta["delimiter"] == "\n"


def test_stepzip_score_writes_the_pairs_as_a_dataset_too(tmp_path) -> None:
    from test_score import FakeScoreClient

    from clients.score import SFT, SFT_DATASET, ScoreConfig, run_score

    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"problem": f"{i}+{i}?", "answer": str(2 * i),
                                          "reasoning": f"{i} and {i}"}) + "\n"
                              for i in range(3)))
    cfg = ScoreConfig(input=str(traces), output=str(tmp_path / "out"), progress=False)
    run_score(cfg, FakeScoreClient(), log=lambda m: None)
    pairs = [json.loads(x) for x in (tmp_path / "out" / SFT).read_text().splitlines()]
    data = datasets.load_from_disk(str(tmp_path / "out" / SFT_DATASET))
    assert [r["id"] for r in data] == [p["id"] for p in pairs] and len(data) == 3
    assert data[0]["completion"] == [{"role": "assistant", "content": pairs[0]["completion"]}]
    assert "0+0?" in data[0]["prompt"][-1]["content"]

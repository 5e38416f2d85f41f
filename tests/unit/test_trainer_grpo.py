"""GRPO stage without an engine: rollout contract, rewards + diagnostics, weight sync,
metrics, checkpoints and resume, with a tiny random Llama and an in-process stand-in for
the stepzip server's HTTP routes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stepzip.data import Problem
from stepzip.rewards import RewardConfig
from trainer.config import GrpoRunConfig
from trainer.grpo import time_split
from trainer.metrics import METRICS_FILE, plot_grpo, read_metrics
from trainer.rewards import completion_diagnostics, make_reward_funcs
from trainer.rollout import StepTimes, group_prompts

CFG = RewardConfig(step_delimiter="\n")


# ---- pure pieces ------------------------------------------------------------------------


def test_group_prompts_collapses_trl_repeats() -> None:
    assert group_prompts(["a", "a", "b", "b"], 2) == (["a", "b"], 2)
    assert group_prompts(["a", "b", "a", "b"], 2) == (["a", "b", "a", "b"], 1)
    assert group_prompts(["a", "a", "a"], 2) == (["a", "a", "a"], 1)
    assert group_prompts([[1, 2], [1, 2]], 2) == ([[1, 2]], 2)


def test_diagnostics_count_skips_steps_accuracy() -> None:
    completions = ["a\n[SKIP]\n[SKIP]\n[SKIP]\n[SKIP]\n</think>\n\nThe answer is 7.",
                   "a\nb\n</think>\n\nThe answer is 3.",
                   "no close at all"]
    d = completion_diagnostics(completions, None, ["7", "7", "7"], CFG, None)
    assert d["stepzip/accuracy"] == pytest.approx(1 / 3)
    assert d["stepzip/closed_reasoning"] == pytest.approx(2 / 3)
    assert d["stepzip/skips"] == pytest.approx(4 / 3)
    assert d["stepzip/skip_ratio"] == pytest.approx((4 / 5) / 3)
    assert d["stepzip/steps"] == pytest.approx((5 + 2 + 1) / 3)


def test_diagnostics_count_a_special_marker_from_ids() -> None:
    # A special [SKIP] vanishes from decoded text; its id still counts.
    d = completion_diagnostics(["a\n\n\n</think>\n\n7"], [[5, 99, 99, 6]], ["7"], CFG, 99)
    assert d["stepzip/skips"] == 2


def test_reward_funcs_named_per_component_and_log_diagnostics() -> None:
    funcs = make_reward_funcs(CFG)
    assert [f.__name__ for f in funcs] == ["correctness", "skip_ratio", "skip_count", "length"]
    logged: dict[str, float] = {}
    completions = ["x\n[SKIP]\n[SKIP]\n[SKIP]\n[SKIP]\n</think>\n\nThe answer is 7."]
    out = funcs[0](prompts=["p"], completions=completions, completion_ids=[[1, 2, 3]],
                   answer=["7"], server_skip_ratio=[0.5],
                   log_metric=lambda k, v: logged.__setitem__(k, v))
    assert out == [2.0]
    assert logged["stepzip/accuracy"] == 1.0 and logged["stepzip/skip_ratio"] == 0.8
    assert logged["stepzip/server_skip_ratio"] == 0.5
    assert funcs[1](prompts=["p"], completions=completions, completion_ids=[[1]],
                    answer=["7"]) == [1.0]


def test_switched_off_components_are_not_rewarded() -> None:
    funcs = make_reward_funcs(RewardConfig(correctness=False, length=False))
    assert [f.__name__ for f in funcs] == ["skip_ratio", "skip_count"]
    with pytest.raises(ValueError):
        make_reward_funcs(RewardConfig(correctness=False, skip_ratio=False, skip_count=False,
                                       length=False))


def test_step_times_snapshot_and_reset() -> None:
    t = StepTimes(rollout_s=2.0, server_skip_ratio=[0.2, 0.4], sync_s=1.0)
    snap = t.snapshot()
    assert snap["rollout_s"] == 2.0 and snap["server_skip_ratio"] == pytest.approx(0.3)
    assert "lock" not in snap
    json.dumps(snap)
    t.reset()
    assert t.rollout_s == 0.0 and t.sync_s is None and t.server_skip_ratio == []


def test_metrics_merge_per_step_split_and_plot(tmp_path) -> None:
    path = tmp_path / METRICS_FILE
    lines = [
        {"step": 1, "rewards/length/mean": -1.0, "reward": -1.0,
         "timing": {"rollout_s": 2.0, "update_s": 3.0, "sync_s": 1.0, "step_s": 5.0}},
        {"step": 1, "checkpoint_s": 0.5},
        {"step": 2, "rewards/length/mean": 0.0, "reward": 0.0,
         "timing": {"rollout_s": 1.0, "update_s": 2.0, "sync_s": 1.0, "step_s": 3.0}},
        {"step": 2, "rewards/length/mean": -0.5, "reward": -0.5,  # resumed, repeated step
         "timing": {"rollout_s": 1.5, "update_s": 2.0, "sync_s": 1.0, "step_s": 3.5}},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["checkpoint_s"] == 0.5 and records[1]["reward"] == -0.5
    split = time_split(records)
    assert split["rollout_s"] == 3.5 and split["sync_s"] == 2.0
    assert split["checkpoint_s"] == 0.5
    png = plot_grpo(path, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trl_vllm_backend_is_gpu_only_and_sets_server_mode() -> None:
    import torch

    from trainer.grpo import grpo_args

    cfg = GrpoRunConfig(backend="trl-vllm", output_dir="/tmp/x", url="http://h:9")
    with pytest.raises(ValueError, match="GPU"):
        grpo_args(cfg, torch.float32, cpu=True)
    args = grpo_args(GrpoRunConfig(output_dir="/tmp/x", num_generations=4,
                                   prompts_per_step=3, grad_accum=2), torch.float32, cpu=True)
    assert args.use_vllm is False and args.num_generations == 4
    assert args.per_device_train_batch_size == 6 and args.generation_batch_size == 12
    assert args.use_cpu and not args.bf16
    with pytest.raises(ValueError, match="divisible"):
        grpo_args(GrpoRunConfig(output_dir="/tmp/x", num_generations=3, prompts_per_step=1,
                                grad_accum=2), torch.float32, cpu=True)


# ---- a whole run against a fake server -----------------------------------------------------


class FakeServer:
    """/v1/completions, /v1/weights/load and /v1/models, in-process.

    Even samples write a compressed, correct completion; odd ones a plain wrong one, so
    rewards differ inside every group and the policy really moves.
    """

    def __init__(self, tokenizer, weights_root: Path):
        self.tok, self.root = tokenizer, weights_root
        self.version_n, self.loads, self.bodies = 0, [], []
        good = "Add.\n[SKIP]\n[SKIP]\n[SKIP]\n[SKIP]\n</think>\n\nThe answer is 7."
        bad = "I think a lot\nand more\n</think>\n\nThe answer is 3."
        eos = [tokenizer.eos_token_id]
        self.samples = [tokenizer.encode(good, add_special_tokens=False) + eos,
                        tokenizer.encode(bad, add_special_tokens=False) + eos]

    @property
    def version(self) -> str:
        return f"v{self.version_n}"

    def completions(self, body: dict) -> dict:
        self.bodies.append(body)
        assert body["return_token_ids"] and body["logprobs"] == 0
        assert body["stepzip"]["marker"] == "[SKIP]" and body["stepzip"]["delimiter"] == "\n"
        choices = []
        for p, prompt in enumerate(body["prompt"]):
            assert isinstance(prompt, list) and isinstance(prompt[0], int)
            for k in range(body["n"]):
                ids = self.samples[k % 2][: body["max_tokens"]]
                choices.append({"index": p * body["n"] + k, "text": self.tok.decode(ids),
                                "finish_reason": "stop", "prompt_token_ids": prompt,
                                "token_ids": ids,
                                "logprobs": {"token_logprobs": [-1.0] * len(ids)},
                                "stepzip": {"n_steps": 5, "n_skips": 4 * (k % 2 == 0),
                                            "skip_ratio": 0.8 * (k % 2 == 0)}})
        return {"choices": choices}

    def load_weights(self, path, checksum=True) -> dict:
        path = Path(path)
        assert self.root in path.parents
        assert (path / "config.json").is_file()
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        self.version_n += 1
        self.loads.append({"path": path.name, "checksum": digest, "version": self.version})
        return {"version": self.version, "checksum": digest, "seconds": 0.01}

    def weight_version(self) -> str:
        return self.version

    def wait_ready(self, timeout: float = 0) -> dict:
        return {"status": "ok"}

    def close(self) -> None:
        pass


@pytest.fixture
def tiny_policy(tmp_path, default_model_dir):
    """A 2-layer random Llama with the SmolLM2 tokenizer plus [SKIP], saved as a folder
    carrying the SFT stage's stepzip_train.json."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.modeling import META_FILE, add_skip_token

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    skip_id = add_skip_token(tok, model, "[SKIP]")
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps({"marker": "[SKIP]", "delimiter": "\n",
                                                "think_close": "</think>",
                                                "skip_token_id": skip_id}))
    return folder, tok


def test_grpo_run_syncs_every_step_logs_components_and_resumes(tmp_path, tiny_policy,
                                                               monkeypatch) -> None:
    from trainer import grpo

    folder, tok = tiny_policy
    run_dir = tmp_path / "run"
    fake = FakeServer(tok, run_dir)
    monkeypatch.setattr(grpo, "StepzipClient", lambda *a, **k: fake)
    problems = [Problem(id=f"p{i}", question=f"What is {i} + 7 - {i}?", answer="7",
                        source="t") for i in range(4)]
    cfg = GrpoRunConfig(model=str(folder), url="http://fake", output_dir=str(run_dir),
                        num_generations=4, prompts_per_step=2, max_completion_length=32,
                        max_steps=2, save_steps=1, save_total_limit=2, learning_rate=1e-3,
                        dtype="float32", plot=True)
    summary = grpo.run_grpo(cfg, problems=problems, log=lambda m: None)

    # One weight load per optimizer step, each a new version and new weights.
    assert [x["version"] for x in fake.loads] == ["v1", "v2"]
    assert fake.loads[0]["checksum"] != fake.loads[1]["checksum"]
    assert [s["version_after"] for s in summary["syncs"]] == ["v1", "v2"]
    assert summary["weight_version_end"] == "v2"
    # The last push became final/ (moved, not copied); older pushes are gone.
    assert list((run_dir / "sync").iterdir()) == []
    assert summary["final_dir"] == str(run_dir / "final")
    # K=4 per prompt, asked once per distinct prompt with n=4.
    assert all(b["n"] == 4 and len(b["prompt"]) <= cfg.request_prompts for b in fake.bodies)
    records = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for name in ("correctness", "skip_ratio", "skip_count", "length"):
            assert f"rewards/{name}/mean" in r
        assert r["rewards/correctness/mean"] == pytest.approx(1.0)  # half right x 2.0
        assert r["stepzip/skip_ratio"] == pytest.approx(0.4)
        assert r["stepzip/accuracy"] == pytest.approx(0.5)
        assert "completions/mean_length" in r
        assert r["timing"]["rollout_s"] > 0 and r["timing"]["sync_s"] > 0
        assert r["weight_version"] == f"v{r['step']}"
    assert (run_dir / "grpo.png").is_file()
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    # Cheap checkpoints: the LoRA adapter, no optimizer state, a truthful model card.
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "optimizer.pt").exists()
    assert not (checkpoint / "model.safetensors").exists()
    assert "[None]" not in (checkpoint / "README.md").read_text()
    assert "[None]" not in (run_dir / "README.md").read_text()  # TRL's card, replaced
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert "[None]" not in (final / "README.md").read_text()
    for path in [*final.iterdir(), *checkpoint.iterdir()]:
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o644, path

    # Resume: the checkpoint's weights are pushed first, then one more step.
    resumed = grpo.run_grpo(GrpoRunConfig(**{**cfg.__dict__, "max_steps": 3,
                                             "resume": "latest"}),
                            problems=problems, log=lambda m: None)
    assert resumed["first_step"] == 2 and resumed["global_step"] == 3
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert [x["path"] for x in fake.loads] == ["step-000001", "step-000002", "step-000002",
                                               "step-000003"]
    # The pushed-on-resume weights are the checkpoint's, i.e. what was live at step 2,
    # though the checkpoint holds no optimizer state (Adam restarts; the weights do not).
    assert fake.loads[2]["checksum"] == fake.loads[1]["checksum"]
    assert [r["step"] for r in read_metrics(run_dir / METRICS_FILE)] == [1, 2, 3]
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_grpo_lora_pushes_merged_weights(tmp_path, tiny_policy, monkeypatch) -> None:
    from safetensors import safe_open

    from trainer import grpo

    folder, tok = tiny_policy
    run_dir = tmp_path / "run"
    fake = FakeServer(tok, run_dir)
    monkeypatch.setattr(grpo, "StepzipClient", lambda *a, **k: fake)
    problems = [Problem(id="p0", question="What is 7?", answer="7", source="t")]
    cfg = GrpoRunConfig(model=str(folder), url="http://fake", output_dir=str(run_dir),
                        num_generations=2, prompts_per_step=1, max_completion_length=16,
                        max_steps=1, save_steps=1, learning_rate=1e-2, dtype="float32",
                        lora=True, lora_r=4, lora_alpha=8, plot=False, save_final=False)
    grpo.run_grpo(cfg, problems=problems, log=lambda m: None)
    assert len(fake.loads) == 1
    with safe_open(run_dir / "sync" / "step-000001" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and not any("lora_" in k or k.startswith("base_model") for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys

"""The whole trainer against live servers, in the tiny CPU configuration:

build-sft (the shared session server, default model) -> sft (a few steps, [SKIP] added)
-> grpo (2 steps) against a second server started on the SFT folder with weight routes
-> a resumed grpo run (1 more step).

Only one engine runs at a time: the shared server is stopped once build-sft is done and
started again at the end only when later tests in the session need it. The wall time of
each stage is printed and written to <run dir>/stage_seconds.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from clients.launcher import ServerProcess
from stepzip.rewards import COMPONENTS
from trainer.build_sft import build_sft
from trainer.config import BuildSftConfig, GrpoRunConfig, SftRunConfig, with_preset
from trainer.grpo import run_grpo
from trainer.metrics import GRPO_PLOT, METRICS_FILE, read_metrics
from trainer.pipeline import disk_usage, serve_argv
from trainer.sft import run_sft

pytestmark = pytest.mark.engine

SECONDS: dict[str, float] = {}


def _later_tests_need(request, names: set[str]) -> bool:
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.module is request.module]
    return any(names & set(getattr(item, "fixturenames", ()))
               for item in items[max(mine, default=len(items)) + 1:])


def test_heldout_evaluation_against_the_live_server(server, default_model_dir) -> None:
    """The demo's held-out pass on real completions: one greedy completion per problem,
    token counts that add up to the server's usage, graded rows."""
    from transformers import AutoTokenizer

    from stepzip.data import load_problems
    from stepzip.rewards import RewardConfig
    from trainer import heldout
    from trainer.grpo import grpo_dataset_rows

    problems = load_problems("asdiv", "test", limit=5, offset=2000)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompts = [r["prompt"] for r in grpo_dataset_rows(problems, tokenizer)]
    rows, summary = heldout.evaluate(server.url, problems, prompts,
                                     RewardConfig(step_delimiter="\n"), max_tokens=12)
    usage = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": prompts, "max_tokens": 12, "temperature": 0.0}).json()["usage"]
    assert [r["id"] for r in rows] == [p.id for p in problems]
    assert sum(r["tokens"] for r in rows) == usage["completion_tokens"]
    assert all(1 <= r["tokens"] <= 12 and r["text"] for r in rows)
    assert all(r["grade"] in ("correct", "wrong", "ungradable", "no_gold") for r in rows)
    assert summary["problems"] == 5 and summary["marker_share"]["mean"] == 0.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer-run")


@pytest.fixture(scope="module")
def pairs(request, server, client, run_dir):
    """build-sft on the shared server; a rerun then finds every problem done."""
    cfg = with_preset(BuildSftConfig, "tiny", url=server.url,
                      output=str(run_dir / "sft.jsonl"))
    SECONDS["shared_server_start"] = server.startup_s or 0.0
    t = time.perf_counter()
    stats = build_sft(cfg, client=client)
    SECONDS["build_sft"] = time.perf_counter() - t
    t = time.perf_counter()
    rerun = build_sft(cfg, client=client)
    SECONDS["build_sft_rerun"] = time.perf_counter() - t
    # Free the machine for the trainer and the second engine.
    server.stop()
    yield cfg, stats, rerun
    if _later_tests_need(request, {"server", "client"}):
        server.start()


@pytest.fixture(scope="module")
def sft_dir(pairs, default_model_dir, run_dir) -> Path:
    cfg = with_preset(SftRunConfig, "tiny", model=str(default_model_dir),
                      data=pairs[0].output, output_dir=str(run_dir / "sft"))
    t = time.perf_counter()
    summary = run_sft(cfg)
    SECONDS["sft"] = time.perf_counter() - t
    assert summary["steps"] == cfg.max_steps
    return Path(cfg.output_dir)


@pytest.fixture(scope="module")
def grpo_server(sft_dir, run_dir):
    grpo_root = run_dir / "grpo"
    grpo_root.mkdir(exist_ok=True)
    argv = serve_argv(str(sft_dir), dtype="float32", max_model_len=1024,
                      weights_root=grpo_root, delimiter="\n",
                      extra=["--served-model-name", "policy", "--kv-cache-gib", "1",
                             "--max-problems", "8"])
    # TRL sets VLLM_LOGGING_LEVEL=ERROR in this process on import; keep the server's log
    # useful.
    env = {"VLLM_LOGGING_LEVEL": "INFO"}
    with ServerProcess(argv, timeout=600, env=env, log_path=run_dir / "grpo-server.log") as proc:
        SECONDS["grpo_server_start"] = proc.startup_s or 0.0
        yield proc


@pytest.fixture(scope="module")
def grpo_runs(grpo_server, sft_dir, run_dir):
    cfg = with_preset(GrpoRunConfig, "tiny", model=str(sft_dir), url=grpo_server.url,
                      output_dir=str(run_dir / "grpo"))
    t = time.perf_counter()
    first = run_grpo(cfg)
    SECONDS["grpo"] = time.perf_counter() - t
    t = time.perf_counter()
    resumed = run_grpo(replace(cfg, max_steps=cfg.max_steps + 1, resume="latest"))
    SECONDS["grpo_resume"] = time.perf_counter() - t
    for name, run in (("grpo", first), ("grpo_resume", resumed)):
        for key, value in run["time_split"].items():
            SECONDS[f"{name}.{key}"] = value
    (run_dir / "stage_seconds.json").write_text(json.dumps(SECONDS, indent=2))
    print("\nstage wall times (s):\n" + "\n".join(f"  {k:28s} {v:8.1f}"
                                                  for k, v in SECONDS.items()))
    return cfg, first, resumed


def test_build_sft_writes_pairs_and_resumes_without_duplicates(pairs) -> None:
    cfg, stats, rerun = pairs
    rows = [json.loads(line) for line in Path(cfg.output).read_text().splitlines()]
    assert stats.processed == cfg.limit and stats.failed_batches == 0
    assert len(rows) == stats.kept_total == stats.kept > 0  # keep=all keeps non-empty ones
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["completion"].count(cfg.think_close) == 1
        assert row["prompt"].endswith("assistant\n") and row["delimiter"] == "\n"
    assert any(cfg.marker in r["completion"] for r in rows)
    assert stats.mean_reduction_kept is not None
    assert rerun.processed == 0 and rerun.already_done == cfg.limit
    assert rerun.kept_total == len(rows)


def test_sft_folder_holds_skip_as_one_normal_token(sft_dir) -> None:
    from transformers import AutoTokenizer

    meta = json.loads((sft_dir / "stepzip_train.json").read_text())
    tok = AutoTokenizer.from_pretrained(sft_dir)
    ids = tok.encode("a\n[SKIP]\nb", add_special_tokens=False)
    assert ids.count(meta["skip_token_id"]) == 1
    assert "[SKIP]" in tok.decode(ids, skip_special_tokens=True)
    assert meta["skip_token_kind"] == "normal" and meta["delimiter"] == "\n"
    assert json.loads((sft_dir / "config.json").read_text())["vocab_size"] == len(tok)


def test_server_loads_the_sft_folder_and_keeps_skip_in_text(grpo_server, sft_dir) -> None:
    meta = json.loads((sft_dir / "stepzip_train.json").read_text())
    skip_id = meta["skip_token_id"]
    # A prompt primed with markers: the SFT'd model tends to continue with them.
    r = httpx.post(grpo_server.url + "/v1/completions", timeout=300, json={
        "prompt": "Step one.\n[SKIP]\n[SKIP]\n[SKIP]\n", "max_tokens": 8,
        "temperature": 0.0, "return_token_ids": True,
        "stepzip": {"delimiter": "\n", "marker": "[SKIP]"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["prompt_token_ids"].count(skip_id) == 3
    generated = choice["token_ids"].count(skip_id)
    assert choice["text"].count("[SKIP]") == generated  # decoding keeps the marker
    assert choice["stepzip"]["n_skips"] == generated


def test_grpo_pushes_new_weights_after_every_step(grpo_runs, grpo_server) -> None:
    cfg, first, resumed = grpo_runs
    versions = [first["weight_version_start"]] + [s["version_after"] for s in first["syncs"]]
    assert len(first["syncs"]) == cfg.max_steps
    assert len(set(versions)) == len(versions)  # a new version after each step
    for sync in first["syncs"]:
        assert Path(sync["path"]).parent == Path(cfg.output_dir) / "sync"
    records = read_metrics(Path(cfg.output_dir) / METRICS_FILE)
    assert [r["weight_version"] for r in records[:cfg.max_steps]] == versions[1:]
    live = httpx.get(grpo_server.url + "/v1/models", timeout=30).json()["data"][0]
    assert live["weight_version"] == resumed["weight_version_end"]


def test_grpo_logs_every_reward_component_per_step(grpo_runs) -> None:
    cfg, _, _ = grpo_runs
    records = read_metrics(Path(cfg.output_dir) / METRICS_FILE)
    assert [r["step"] for r in records] == list(range(1, cfg.max_steps + 2))
    for record in records:
        for name in COMPONENTS:
            assert isinstance(record[f"rewards/{name}/mean"], float)
        for key in ("reward", "stepzip/skip_ratio", "stepzip/accuracy",
                    "completions/mean_length"):
            assert key in record, key
        timing = record["timing"]
        assert timing["rollout_s"] > 0 and timing["sync_s"] > 0
    assert (Path(cfg.output_dir) / GRPO_PLOT).stat().st_size > 0


def test_grpo_checkpoint_and_resume(grpo_runs) -> None:
    cfg, first, resumed = grpo_runs
    out = Path(cfg.output_dir)
    assert first["global_step"] == cfg.max_steps
    assert resumed["resumed_from"] == str(out / f"checkpoint-{cfg.max_steps}")
    assert resumed["first_step"] == cfg.max_steps
    assert resumed["global_step"] == cfg.max_steps + 1
    state = json.loads((out / f"checkpoint-{cfg.max_steps + 1}" / "trainer_state.json")
                       .read_text())
    assert state["global_step"] == cfg.max_steps + 1
    # On resume the checkpoint's weights went to the server first, then step 3's.
    assert [s["step"] for s in resumed["syncs"]] == [cfg.max_steps, cfg.max_steps + 1]
    assert resumed["syncs"][0]["version_before"] == first["weight_version_end"]
    # ...and they are exactly the weights the server held after step 2.
    assert resumed["syncs"][0]["checksum"] == first["syncs"][-1]["checksum"]
    assert (out / "final" / "model.safetensors").is_file()
    # Resuming needs no optimizer state; none was written.
    assert not list(out.rglob("optimizer.pt"))


def test_tiny_run_stays_small_on_disk_and_readable(grpo_runs, sft_dir, run_dir) -> None:
    # The budget for the tiny pipeline: 1.5 GB (it was 3.1 GB with an optimizer in
    # every checkpoint and four weight copies).
    used = disk_usage(run_dir)
    print(f"\ntiny run on disk: {used / 1e9:.2f} GB")
    assert used <= 1.5e9
    for folder in (sft_dir, Path(grpo_runs[0].output_dir) / "final"):
        assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
        assert "[None]" not in (folder / "README.md").read_text()
    assert (sft_dir / "sft_loss.png").stat().st_size > 0
    assert read_metrics(sft_dir / METRICS_FILE)

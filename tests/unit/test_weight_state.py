"""Weight state is one truth, without an engine: the weight service and the engine façade
over fake data-parallel workers (NCCL transfers cannot run on the CPU). A worker's
`weights` is what it would generate with; the version label must name it, on every
engine, after timeouts, failed transfers and loads that fail in one engine only."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from server.engine.engine import Engine, WeightVersion, one_engine_digests
from server.errors import ApiError
from server.services.weights import WeightService
from server.settings import ServerSettings
from server.weightgate import HeldUpdate, WeightGate


class FakeWorker:
    """The stepzip_* weight methods of server/engine/worker_ext.py, on a string."""

    def __init__(self, engine: int, weights: str) -> None:
        self.engine, self.weights, self.snapshot = engine, weights, None
        self.fail_load = False
        self.problems: list[str] = []

    def stepzip_check_checkpoint(self, tensors) -> list[str]:
        return self.problems

    def stepzip_reload_weights(self, path: str) -> str | None:
        if self.fail_load:  # half-way: some layers hold the new weights
            self.weights = f"half of {path}"
            return "OSError: injected fault"
        self.weights = path
        return None

    def stepzip_snapshot_weights(self) -> int:
        self.snapshot = self.weights
        return 1

    def stepzip_restore_weights(self, path: str | None) -> None:
        if path is None and self.snapshot is None:
            raise RuntimeError("no last good weights to restore")
        self.weights, self.snapshot = (path if path is not None else self.snapshot), None

    def stepzip_drop_snapshot(self) -> None:
        self.snapshot = None

    def compute_weight_checksums(self) -> dict[str, str]:
        return {f"dp{self.engine}:pp0:pcp0:tp0:w": hashlib.sha256(
            self.weights.encode()).hexdigest()}


class FakeLLM:
    """AsyncLLM as stepzip uses it, over `engines` data-parallel engines of one worker."""

    def __init__(self, engines: int, weights: str) -> None:
        self.workers = [FakeWorker(i, weights) for i in range(engines)]
        self.engine_core = self
        self.errored = False
        self.update_seconds = 0.0
        self.before_checksum = None  # optional coroutine function awaited by the checksum

    async def call_utility_all_async(self, utility, method, _unique, args, _kwargs):
        assert utility == "collective_rpc"
        return [[getattr(w, method)(*args)] for w in self.workers]

    async def collective_rpc(self, method, args=()):
        # vLLM 0.32 under data parallelism: every engine runs it, engine 0 answers
        return [getattr(w, method)(*args) for w in self.workers][:1]

    async def start_weight_update(self) -> None:
        for w in self.workers:  # layerwise reload set up: the weights are being replaced
            w.weights = f"{w.weights} (being overwritten)"

    async def update_weights(self, request) -> None:
        await asyncio.sleep(self.update_seconds)
        if request == "broken":
            raise RuntimeError("NCCL timeout")
        for w in self.workers:
            w.weights = f"transfer {request}"

    async def finish_weight_update(self, weight_version=None) -> None:
        pass

    async def reset_prefix_cache(self) -> None:
        pass

    async def compute_weight_checksums(self) -> list[dict[str, str]]:
        if self.before_checksum is not None:
            await self.before_checksum()
        return [w.compute_weight_checksums() for w in self.workers]


@pytest.fixture
def root(tmp_path):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp_path / name / "model.safetensors"))
    return tmp_path


def make_service(root, engines: int = 2, timeout: float = 600.0):
    settings = ServerSettings(weights_root=str(root))
    engine = Engine(settings)
    engine.llm = FakeLLM(engines, str(root / "first"))
    engine.weights = WeightVersion(path=str(root / "first"))
    gate = WeightGate()
    return WeightService(engine, settings, gate, HeldUpdate(timeout)), engine.llm


async def served(service: WeightService) -> tuple[list[str], str]:
    """What every engine would generate with, and the version a response would carry:
    read as a generation, so the gate must be open."""
    async with asyncio.timeout(5), service.gate.generation():
        return [w.weights for w in service.engine.llm.workers], service.engine.weights.label


async def transfer(service: WeightService, request: str) -> str:
    await service.start_update()
    await service.update(request)
    return await service.finish_update()


def test_a_timed_out_update_restores_the_last_good_weights_and_version(root):
    async def scenario():
        service, _ = make_service(root, timeout=0.05)
        before = await served(service)
        await service.start_update()
        await service.update("half")  # the trainer dies here
        await asyncio.sleep(0.2)
        after = await served(service)
        with pytest.raises(ApiError) as late:
            await service.update("late")
        return before, after, late.value

    before, after, late = asyncio.run(scenario())
    assert after == before == ([str(root / "first")] * 2, "v0")
    assert late.status == 409 and "timed out" in late.error


def test_a_timed_out_update_after_a_transfer_restores_the_transferred_weights(root):
    async def scenario():
        service, llm = make_service(root, timeout=0.05)
        assert await transfer(service, "t1") == "v1"
        before = await served(service)
        await service.start_update()
        await service.update("t2")
        await asyncio.sleep(0.2)
        return before, await served(service), [w.snapshot for w in llm.workers]

    before, after, snapshots = asyncio.run(scenario())
    assert after == before == (["transfer t1"] * 2, "v1")
    assert snapshots == [None, None]  # the host copy is freed once restored


def test_a_call_still_moving_weights_is_not_cut_by_the_timeout(root):
    async def scenario():
        service, llm = make_service(root, timeout=0.05)
        llm.update_seconds = 0.2
        return await transfer(service, "slow"), await served(service)

    assert asyncio.run(scenario()) == ("v1", (["transfer slow"] * 2, "v1"))


def test_a_failed_transfer_restores_and_keeps_the_version(root):
    async def scenario():
        service, _ = make_service(root)
        await service.start_update()
        with pytest.raises(ApiError) as failed:
            await service.update("broken")
        return failed.value, await served(service)

    failed, after = asyncio.run(scenario())
    assert failed.status == 409
    assert after == ([str(root / "first")] * 2, "v0")


def test_a_failed_load_after_a_transfer_keeps_the_transferred_weights_and_label(root):
    async def scenario():
        service, llm = make_service(root)
        await transfer(service, "t1")
        llm.workers[1].fail_load = True
        with pytest.raises(ApiError) as failed:
            await service.load(str(root / "second"), checksum=False)
        kept = await served(service)
        llm.workers[1].fail_load = False
        loaded = await service.load(str(root / "second"), checksum=False)
        return failed.value, kept, loaded, await served(service)

    failed, kept, loaded, after = asyncio.run(scenario())
    assert failed.status == 422 and failed.details[0]["field"] == "path"
    assert "1 of 2 workers failed" in failed.details[0]["reason"]
    assert kept == (["transfer t1"] * 2, "v1")
    assert loaded.version == "v2" and after == ([str(root / "second")] * 2, "v2")


def test_a_load_failing_in_one_engine_restores_every_engine(root):
    async def scenario():
        service, llm = make_service(root, engines=2)
        llm.workers[1].fail_load = True  # engine 0 loads, engine 1 fails half-way
        with pytest.raises(ApiError) as failed:
            await service.load(str(root / "second"), checksum=False)
        return failed.value, await served(service)

    failed, after = asyncio.run(scenario())
    assert failed.status == 422
    assert after == ([str(root / "first")] * 2, "v0")


def test_the_dry_run_of_every_engine_is_heard(root):
    async def scenario():
        service, llm = make_service(root, engines=2)
        llm.workers[1].problems = ["w: shape [2] does not fit w [3]"]
        with pytest.raises(ApiError) as refused:
            await service.load(str(root / "second"), checksum=False)
        return refused.value, await served(service)

    refused, after = asyncio.run(scenario())
    assert refused.status == 422 and "does not fit" in refused.details[0]["reason"]
    assert after == ([str(root / "first")] * 2, "v0")


def test_the_checksum_is_taken_while_generations_run(root):
    """A generation sent while the checksum runs finishes before it: the exclusive gate
    is not held (on a large checkpoint hashing takes minutes)."""
    async def scenario():
        service, llm = make_service(root)
        checksum_started, generated = asyncio.Event(), asyncio.Event()

        async def wait_for_a_generation():
            checksum_started.set()
            await asyncio.wait_for(generated.wait(), 5)

        async def generation():
            await checksum_started.wait()
            await served(service)
            generated.set()

        llm.before_checksum = wait_for_a_generation
        loaded, _ = await asyncio.gather(service.load(str(root / "second"), checksum=True),
                                         generation())
        return loaded

    loaded = asyncio.run(scenario())
    assert loaded.version == "v1"
    assert loaded.checksum == hashlib.sha256(b"=".join([
        b"pp0:pcp0:tp0:w", hashlib.sha256(str(root / "second").encode()).hexdigest().encode()])
        + b";").hexdigest()


def test_no_other_update_starts_while_a_load_takes_its_checksum(root):
    async def scenario():
        service, llm = make_service(root)
        order = []

        async def slow_checksum():
            order.append("checksum")
            await asyncio.sleep(0.1)
            order.append("checksum done")

        async def second_load():
            while not order:
                await asyncio.sleep(0.01)
            await service.load(str(root / "first"), checksum=False)
            order.append("second load")

        llm.before_checksum = slow_checksum
        await asyncio.gather(service.load(str(root / "second"), checksum=True), second_load())
        return order, await served(service)

    order, after = asyncio.run(scenario())
    assert order == ["checksum", "checksum done", "second load"]
    assert after == ([str(root / "first")] * 2, "v2")


def test_engines_holding_different_weights_have_no_checksum():
    same = [{"dp0:pp0:tp0:w": "a"}, {"dp1:pp0:tp0:w": "a"}]
    assert one_engine_digests(same) == {"pp0:tp0:w": "a"}
    with pytest.raises(RuntimeError, match="engine dp1 holds other weights"):
        one_engine_digests([{"dp0:pp0:tp0:w": "a"}, {"dp1:pp0:tp0:w": "b"}])


# ---- the worker side (server/engine/weightcheck.py) on a tiny torch model ---------------

class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def load_weights(self, weights) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)


class TinyWorker:
    """The parts of vLLM's worker that weightcheck.py uses; `folders`: path -> tensors."""

    def __init__(self, engine: int) -> None:
        from types import SimpleNamespace

        self.model = TinyModel()
        self.model_runner = SimpleNamespace(get_model=lambda: self.model)
        self.vllm_config = SimpleNamespace(
            parallel_config=SimpleNamespace(data_parallel_index=engine),
            model_config=SimpleNamespace(dtype=torch.float32))
        self.folders = {name: {n: torch.full_like(p, value) for n, p in
                               self.model.named_parameters()}
                        for name, value in (("old", 1.0), ("new", 2.0))}
        self.reload_weights(weights_path="old")

    def reload_weights(self, weights_iterator=None, weights_path=None,
                       is_checkpoint_format=True) -> None:
        weights = weights_iterator or iter(self.folders[weights_path].items())
        if is_checkpoint_format:
            self.model.load_weights(weights)
        else:  # vLLM's kernel-format reload: copy into each parameter
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in weights:
                    params[name].copy_(tensor)

    def values(self) -> dict[str, float]:
        return {n: p.mean().item() for n, p in self.model.named_parameters()}


def test_an_injected_fault_fails_only_the_named_engine_half_way(monkeypatch):
    from server.engine import weightcheck

    monkeypatch.setenv(weightcheck.FAULT_ENV, "1")
    monkeypatch.setattr(weightcheck, "FAULT_AFTER_TENSORS", 2)
    healthy, faulty = TinyWorker(0), TinyWorker(1)
    assert weightcheck.reload_in_place(healthy, "new") is None
    error = weightcheck.reload_in_place(faulty, "new")
    assert error.startswith("OSError: injected fault")
    assert healthy.values() == {"a.weight": 2, "a.bias": 2, "b.weight": 2, "b.bias": 2}
    assert faulty.values() == {"a.weight": 2, "a.bias": 2, "b.weight": 1, "b.bias": 1}
    for worker in (healthy, faulty):  # what the server does when any worker failed
        weightcheck.restore_weights(worker, "old", None)
        assert set(worker.values().values()) == {1}
    assert "load_weights" not in vars(faulty.model)  # the hook is gone


def test_weights_no_folder_holds_come_back_from_the_host_copy():
    from server.engine import weightcheck

    worker = TinyWorker(0)
    worker.reload_weights(weights_iterator=iter(
        {n: torch.full_like(p, 7.0) for n, p in worker.model.named_parameters()}.items()))
    snapshot = weightcheck.host_snapshot(worker.model)  # "transferred" weights: 7
    assert weightcheck.reload_in_place(worker, "new") is None
    weightcheck.restore_weights(worker, None, snapshot)
    assert set(worker.values().values()) == {7}
    with pytest.raises(RuntimeError, match="no last good weights"):
        weightcheck.restore_weights(worker, None, None)

"""Teacher forcing (/v1/score) in both runners' interfaces, chained after the entropy
processor the way vLLM chains them, with greedy sampling: every forced request must emit
exactly its tokens, and its entropies must be those of the unforced logits."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality, build_logitsprocs
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

import server.engine.entropy as entropy_mod
from server.engine.engine import logits_processors
from server.engine.entropy import EXTRA_ARGS_KEY, entropy_torch
from server.engine.forcing import FORCE_KEY, ForcingProcessorV1, ForcingProcessorV2, teacher_forcing
from server.engine.processor_v1 import EntropyProcessorV1
from server.engine.processor_v2 import EntropyProcessorV2
from tests.unit.vllm_batch import VOCAB, fake_vllm_config, random_logits

SWAP = MoveDirectionality.SWAP


@pytest.fixture(autouse=True)
def fresh_store():
    entropy_mod._STORE = None  # the worker's store is a process-wide singleton
    yield
    entropy_mod._STORE = None


def forced_params(key: str, ids: list[int]) -> SamplingParams:
    kw = teacher_forcing(ids)
    kw["extra_args"] = {**kw["extra_args"], EXTRA_ARGS_KEY: key}
    return SamplingParams(**kw)


class Request:
    def __init__(self, key: str, forced: list[int] | None, prompt_len: int = 4):
        self.key, self.forced, self.prompt_len = key, forced, prompt_len
        self.params = (forced_params(key, forced) if forced
                       else SamplingParams(max_tokens=64, extra_args={EXTRA_ARGS_KEY: key}))
        self.out: list[int] = []  # the live output list vLLM shares with V1 processors
        self.expected: list[float] = []  # entropy of the unforced row at each position
        self.slot: int | None = None


def sample_greedy(reqs_by_row: list[Request], logits: torch.Tensor,
                  before: torch.Tensor) -> None:
    """What vLLM does after the processors: argmax per row, appended to the output."""
    h = entropy_torch(before)
    for row, req in enumerate(reqs_by_row):
        req.expected.append(h[row].item())
        req.out.append(int(logits[row].argmax()))


def test_engine_registers_entropy_before_forcing_and_vllm_keeps_that_order():
    """vLLM's own legacy loader, given the engine's list: entropy, then forcing, both in
    the group applied before sampling (not argmax-invariant)."""
    assert logits_processors(use_v2=True) == [
        "server.engine.processor_v2:EntropyProcessorV2",
        "server.engine.forcing:ForcingProcessorV2"]
    config = fake_vllm_config()
    config.speculative_config = None
    procs = build_logitsprocs(config, torch.device("cpu"), False, False,
                              logits_processors(use_v2=False))
    names = [type(p).__name__ for p in procs.non_argmax_invariant]
    assert names[-2:] == ["EntropyProcessorV1", "ForcingProcessorV1"]


def test_forcing_arguments_and_validation():
    sp = SamplingParams(**teacher_forcing([5, 0, 7]))
    assert sp.max_tokens == 3 and sp.ignore_eos and sp.temperature == 0.0
    ForcingProcessorV1.validate_params(sp)
    ForcingProcessorV2.validate_params(SamplingParams())
    for bad in ([], [1, -2], [1.5], "12", [True]):
        with pytest.raises(ValueError, match=FORCE_KEY):
            ForcingProcessorV1.validate_params(SamplingParams(extra_args={FORCE_KEY: bad}))
        with pytest.raises(ValueError, match=FORCE_KEY):
            ForcingProcessorV2.validate_params(SamplingParams(extra_args={FORCE_KEY: bad}))


def test_v1_forced_rows_emit_their_tokens_and_keep_unforced_entropies():
    config = fake_vllm_config(max_num_seqs=4)
    entropy = EntropyProcessorV1(config, torch.device("cpu"), False)
    forcing = ForcingProcessorV1(config, torch.device("cpu"), False)
    assert forcing.is_argmax_invariant() is False
    gen = torch.Generator().manual_seed(0)
    a = Request("a", [3, 17, 95, 3, 0, 42])
    b = Request("b", None)  # sampled freely in the same batch
    c = Request("c", [8, 8, 8, 8])
    rows = [a, b, c]
    update = BatchUpdate(batch_size=3, removed=[], moved=[],
                         added=[(i, r.params, [1] * r.prompt_len, r.out)
                                for i, r in enumerate(rows)])
    for step in range(6):
        for proc in (entropy, forcing):
            proc.update_state(update)
        logits = random_logits(len(rows), gen)
        before = logits.clone()
        for proc in (entropy, forcing):  # vLLM's order: the engine's list order
            logits = proc.apply(logits)
        sample_greedy(rows, logits, before)
        assert torch.equal(logits[rows.index(b)], before[rows.index(b)]), "b untouched"
        update = None
        if step == 1:  # rows move: swap a and c, as condensing/reordering does
            rows[0], rows[2] = rows[2], rows[0]
            update = BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, SWAP)])
        if step == 3:  # c has its 4 tokens and leaves; vLLM condenses the last row in
            rows = [a, b]
            update = BatchUpdate(batch_size=2, removed=[0], added=[],
                                 moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)])
    assert a.out == a.forced and c.out == c.forced
    fetched = entropy.store.fetch([("a", 6), ("c", 4)])
    for req in (a, c):
        assert fetched[req.key] == pytest.approx(req.expected, abs=1e-6)


def test_v1_position_past_the_forced_tokens_and_out_of_vocab_ids_are_left_alone():
    forcing = ForcingProcessorV1(fake_vllm_config(), torch.device("cpu"), False)
    req = Request("a", [1, VOCAB + 5])
    forcing.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                                     added=[(0, req.params, [1], req.out)]))
    req.out.append(1)  # position 1: id beyond this vocab -> nothing to force
    logits = torch.randn(1, VOCAB)
    assert torch.equal(forcing.apply(logits.clone()), logits)
    req.out.append(2)  # position 2: past the forced tokens
    assert torch.equal(forcing.apply(logits.clone()), logits)


class V2Slots:
    """Model Runner V2's slot table and sampler call order, with greedy sampling."""

    def __init__(self, max_num_reqs: int = 4, max_model_len: int = 64):
        self.prompt_len = np.zeros(max_num_reqs, dtype=np.int32)
        self.prefill_len = np.zeros(max_num_reqs, dtype=np.int32)
        self.uva_prompt = type("Uva", (), {})()
        self.uva_prefill = type("Uva", (), {})()
        req_states = LogitsProcRequestState(
            device=torch.device("cpu"), max_num_reqs=max_num_reqs, vocab_size=VOCAB,
            all_token_ids=None, prompt_len=self.uva_prompt, prefill_len=self.uva_prefill,
            total_len=None)
        config = fake_vllm_config(max_num_reqs, max_model_len)
        self.procs = [EntropyProcessorV2(config, req_states),
                      ForcingProcessorV2(config, req_states)]
        self.free = list(range(max_num_reqs))
        self.computed: dict[str, int] = {}
        self.gen = torch.Generator().manual_seed(1)
        self.rng = random.Random(1)
        self.flush()

    def flush(self) -> None:
        self.uva_prompt.gpu = torch.from_numpy(self.prompt_len.copy())
        self.uva_prefill.gpu = torch.from_numpy(self.prefill_len.copy())
        for proc in self.procs:
            proc.apply_staged_writes()

    def add(self, req: Request) -> None:
        """New or resumed (after preemption: prefill = prompt + output so far)."""
        req.slot = self.free.pop()
        self.prompt_len[req.slot] = req.prompt_len
        self.prefill_len[req.slot] = req.prompt_len + len(req.out)
        self.computed[req.key] = 0
        for proc in self.procs:
            proc.add_request(req.slot, req.params)
        self.flush()

    def remove(self, req: Request) -> None:
        self.free.append(req.slot)

    def step(self, scheduled: list[tuple[Request, int]]) -> None:
        """Each (request, tokens fed) gets the row of its last fed token; rows shuffled."""
        self.rng.shuffle(scheduled)
        slots = [r.slot for r, _ in scheduled]
        pos = [self.computed[r.key] + n - 1 for r, n in scheduled]
        idx = torch.tensor(slots)
        ctx = LogitsContext(idx, idx, idx.numpy(), torch.zeros(len(slots), dtype=torch.int32),
                            torch.zeros(len(slots), dtype=torch.int32),
                            torch.tensor(pos, dtype=torch.int32), np.array(pos) + 1)
        logits = random_logits(len(slots), self.gen)
        before = logits.clone()
        for proc in self.procs:
            logits = proc.apply(logits, ctx)
        h = entropy_torch(before)
        for row, (req, n) in enumerate(scheduled):
            self.computed[req.key] += n
            if req.forced is None or self.computed[req.key] < req.prompt_len + len(req.out):
                # free or in a partial prefill: forcing must not have touched the row
                assert torch.equal(logits[row], before[row]), req.key
            if self.computed[req.key] == req.prompt_len + len(req.out):  # samples
                req.expected.append(h[row].item())
                req.out.append(int(logits[row].argmax()))


def test_v2_forced_slots_emit_their_tokens_through_prefill_chunks_and_preemption():
    run = V2Slots()
    a = Request("a", [4, 90, 4, 11, 12, 13, 0, 1], prompt_len=6)
    b = Request("b", None, prompt_len=3)
    run.add(a)
    run.add(b)
    run.step([(a, 4), (b, 3)])  # a's prefill is chunked: 4 of 6 prompt tokens
    run.step([(a, 2), (b, 1)])
    for _ in range(3):
        run.step([(a, 1), (b, 1)])
    run.remove(a)  # preempted; b's finished slot is recycled by a resumed request
    run.remove(b)
    run.add(a)
    run.step([(a, a.prompt_len + len(a.out))])  # recompute prompt + output, then sample
    while len(a.out) < len(a.forced):
        run.step([(a, 1)])
    assert a.out == a.forced
    got = run.procs[0].store.fetch([("a", len(a.out))])["a"]
    assert got == pytest.approx(a.expected, abs=1e-6)


def test_v2_recycled_slot_forgets_the_previous_requests_tokens():
    run = V2Slots(max_num_reqs=2)
    a, c = Request("a", [7, 7, 7, 7]), Request("c", [5, 6, 7])
    run.add(a)
    run.add(c)
    run.step([(a, a.prompt_len), (c, c.prompt_len)])
    run.remove(a)
    b = Request("b", None)
    run.add(b)  # a's slot, not forced
    assert b.slot == a.slot
    run.step([(b, b.prompt_len), (c, 1)])
    run.step([(b, 1), (c, 1)])
    assert c.out == c.forced
    assert len(b.out) == 2  # and its rows were left alone (checked in step)

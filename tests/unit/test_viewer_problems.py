"""/v1/problems parses a dataset split once, in a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
import threading

from server.routes import viewer
from stepzip.data import Problem


def test_a_split_is_parsed_once_off_the_loop_and_sliced_per_call(monkeypatch):
    loads: list[tuple[str, str, threading.Thread]] = []

    def load_problems(dataset, split):
        loads.append((dataset, split, threading.current_thread()))
        return [Problem(id=f"p{i}", question=f"q{i}", answer=str(i), source=dataset)
                for i in range(5)]

    monkeypatch.setattr(viewer, "load_problems", load_problems)
    viewer._split.cache_clear()

    async def calls():
        loop_thread = threading.current_thread()
        pages = await asyncio.gather(*(viewer.problems("svamp", "test", limit=2, offset=k)
                                       for k in range(4)))
        return loop_thread, pages

    try:
        loop_thread, pages = asyncio.run(calls())
    finally:
        viewer._split.cache_clear()  # other tests read the real files
    assert len(loads) == 1 and loads[0][:2] == ("svamp", "test")  # four calls, one parse
    assert loads[0][2] is not loop_thread
    assert [[p.id for p in page.data] for page in pages] == [
        ["p0", "p1"], ["p1", "p2"], ["p2", "p3"], ["p3", "p4"]]

"""Readers-writer gate between generation and weight updates.

Every generation holds the gate shared for its whole life; a weight update takes it
exclusively: it waits for in-flight generations to finish and holds new ones back until
the new weights are in. So no response mixes old and new weights, and none fails: a
request arriving during an update simply waits.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class WeightGate:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = 0
        self._updating = False
        self._waiting_writers = 0

    @asynccontextmanager
    async def generation(self):
        async with self._cond:
            # Writers first: a steady stream of requests must not starve an update.
            await self._cond.wait_for(lambda: not self._updating and not self._waiting_writers)
            self._active += 1
        try:
            yield
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._waiting_writers += 1
            try:
                await self._cond.wait_for(lambda: not self._updating and self._active == 0)
            finally:
                self._waiting_writers -= 1
            self._updating = True
        try:
            yield
        finally:
            async with self._cond:
                self._updating = False
                self._cond.notify_all()

    @property
    def active(self) -> int:
        return self._active


class HeldUpdate:
    """Holds the gate exclusively across HTTP calls (TRL's start_weight_update ...
    finish_weight_update). Released automatically after `timeout` seconds so a trainer
    that dies mid-update cannot block generation forever."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout
        self._release: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self, gate: WeightGate) -> None:
        if self._task is not None and not self._task.done():
            return
        acquired, self._release = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with gate.exclusive():
                acquired.set()
                try:
                    await asyncio.wait_for(self._release.wait(), self.timeout)
                except TimeoutError:
                    pass

        self._task = asyncio.create_task(hold())
        try:
            await acquired.wait()
        except BaseException:  # the caller gave up waiting: never take the gate later
            self._task.cancel()
            self._task = None
            raise

    @property
    def held(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._release.set()
            await self._task
            self._task = None

"""Readers-writer gate between generation and weight updates.

Every generation holds the gate shared for its whole life; a weight update takes it
exclusively: it waits for in-flight generations to finish and holds new ones back until
the new weights are in. So no response mixes old and new weights, and none fails: a
request arriving during an update simply waits.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager, contextmanager


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
        """Hold the gate alone; yields a handle whose `share()` lets generations back in
        before the block ends (see `Exclusive`)."""
        async with self._cond:
            self._waiting_writers += 1
            try:
                await self._cond.wait_for(lambda: not self._updating and self._active == 0)
            finally:
                self._waiting_writers -= 1
            self._updating = True
        held = Exclusive(self)
        try:
            yield held
        finally:
            async with self._cond:
                if held.shared:
                    self._active -= 1
                else:
                    self._updating = False
                self._cond.notify_all()

    @property
    def active(self) -> int:
        return self._active


class Exclusive:
    """An exclusive hold that can step down to a shared one without letting go: after
    `share()` generations run again, but no other update can start before the block
    ends. A load uses it to checksum the weights it just wrote: reading them must not
    hold every request back, and must not read someone else's update."""

    def __init__(self, gate: WeightGate) -> None:
        self.gate, self.shared = gate, False

    async def share(self) -> None:
        gate = self.gate
        async with gate._cond:
            if not self.shared:
                gate._updating, gate._active, self.shared = False, gate._active + 1, True
                gate._cond.notify_all()


class HeldUpdate:
    """Holds the gate exclusively across HTTP calls (TRL's start_weight_update ...
    finish_weight_update). Released automatically after `timeout` seconds (another
    `timeout` each time a call of the update is still running then), so a trainer that
    dies mid-update cannot block generation forever; `on_timeout` runs first, still
    holding the gate, so that half-written weights are never served."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout
        self.timed_out = False  # the last hold ended by its timeout
        self._release: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running = 0  # calls of the update in progress (see `step`)

    async def start(self, gate: WeightGate, on_timeout=None) -> None:
        """Take the gate; `on_timeout`: an async callable run if the hold times out."""
        if self._task is not None and not self._task.done():
            return
        acquired, self._release = asyncio.Event(), asyncio.Event()
        self.timed_out = False

        async def hold() -> None:
            async with gate.exclusive():
                acquired.set()
                while not self._release.is_set():
                    try:
                        await asyncio.wait_for(self._release.wait(), self.timeout)
                    except TimeoutError:
                        if self._running:  # a call is still moving weights: wait on
                            continue
                        self.timed_out = True  # from here `held` is False: no new calls
                        if on_timeout is not None:
                            await on_timeout()
                        return

        self._task = asyncio.create_task(hold())
        try:
            await acquired.wait()
        except BaseException:  # the caller gave up waiting: never take the gate later
            self._task.cancel()
            self._task = None
            raise

    @property
    def held(self) -> bool:
        return self._task is not None and not self._task.done() and not self.timed_out

    @contextmanager
    def step(self):
        """One call of the held update: the timeout does not end the hold under it."""
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    async def stop(self) -> None:
        if self._task is not None:
            self._release.set()
            await self._task
            self._task = None

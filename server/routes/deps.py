"""Small dependencies shared by routers."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request

from server.errors import ApiError, not_ready


def engine_dead() -> ApiError:
    return ApiError(503, "the engine is dead (its core process exited); this server is "
                         "exiting so that its supervisor restarts it")


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong API key", "authorization",
                    "expected 'Authorization: Bearer <key>'")


def ready_engine(request: Request):
    engine = request.app.state.engine
    if engine.dead:
        raise engine_dead()
    if not engine.ready or request.app.state.compressor is None:
        raise not_ready()
    return engine


async def unless_disconnected(request: Request, coro):
    """Await `coro`, cancelling it if the client goes away (vLLM then aborts the engine
    requests), so abandoned requests stop using the engine."""
    task = asyncio.ensure_future(coro)
    while True:
        try:
            done, _ = await asyncio.wait({task}, timeout=1.0)
        except asyncio.CancelledError:  # the server is stopping: stop the work too
            task.cancel()
            raise
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ApiError(499, "client closed the request")

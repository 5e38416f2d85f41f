"""Small dependencies shared by routers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from fastapi import Request

from server.errors import ApiError, not_ready


def ready_engine(request: Request):
    engine = request.app.state.engine
    if not engine.ready or engine.dead:
        raise not_ready()
    return engine


async def check_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if not key or request.url.path == "/health":
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "missing or wrong API key", "authorization",
                       "expected 'Authorization: Bearer <key>'")


async def unless_disconnected(request: Request, coro):
    """Await `coro`, cancelling it if the client goes away (vLLM then aborts the engine
    requests), so abandoned requests stop using the engine."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ApiError(499, "client closed the request")

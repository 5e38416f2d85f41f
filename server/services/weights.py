"""The weight service: everything behind the weight routes. One truth: the version
reported by /v1/models and /health names the weights every engine serves. It moves only
once new weights are fully in on every worker; any failure, and an update held past its
timeout, puts the last good weights back (the version stays) before the gate opens.

- `load`: reload a safetensors checkpoint folder in place (CPU and GPU). Before anything
  touches the engine: the folder and every file in it must really lie under a
  --weights-root (symlinks resolved), the headers must parse, and a dry run of the model's
  own loader in every worker must find every parameter, no unknown tensor and matching
  shapes. A load that still fails half-way in any worker restores the last good weights
  on all of them: their folder, or a host copy if they came from an NCCL transfer.
- TRL's NCCL sync steps (`init_transfer`, `start_update`, `update`, `finish_update`),
  forwarded to the engine. A failed step answers 409, restores the last good weights
  and releases the gate.

Both take the weight gate exclusively (see server/weightgate.py): in-flight generations
finish on the old weights, new ones wait for the new weights. A load's checksum reads the
new weights after generations are let back in (other updates still wait).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from server.checkpoint import CheckpointError, read_checkpoint, resolve_folder
from server.engine.engine import Engine, WeightLoadError
from server.errors import ApiError, invalid
from server.weightgate import HeldUpdate, WeightGate
from stepzip.schemas.openai import WeightsLoadResponse

log = logging.getLogger("stepzip.weights")


def allowed_roots(settings) -> list[Path]:
    if not settings.weights_root:
        return []
    return [Path(p).resolve() for p in settings.weights_root.split(os.pathsep) if p]


def checked_checkpoint(settings, raw: str) -> tuple[Path, list[tuple[str, list[int], str]]]:
    """The folder and its tensors, or the 4xx that says why it cannot be loaded."""
    roots = allowed_roots(settings)
    if not roots:
        raise ApiError(403, "no --weights-root is configured", "path",
                       "the server accepts no checkpoint paths")
    try:
        folder = resolve_folder(raw, roots)
        return folder, read_checkpoint(folder, roots)
    except PermissionError as exc:
        raise ApiError(403, str(exc), "path", "must lie under a --weights-root folder") from exc
    except (CheckpointError, OSError) as exc:
        raise invalid("path", str(exc)) from exc


class WeightService:
    def __init__(self, engine: Engine, settings, gate: WeightGate, hold: HeldUpdate):
        self.engine, self.settings, self.gate, self.hold = engine, settings, gate, hold

    async def load(self, path: str, checksum: bool) -> WeightsLoadResponse:
        folder, tensors = await asyncio.to_thread(checked_checkpoint, self.settings, path)
        problems = await self.engine.check_checkpoint(tensors)
        if problems:
            raise invalid("path", f"does not fit the served model: {'; '.join(problems)}")
        started = time.perf_counter()
        async with self.gate.exclusive() as held:
            try:
                version = await self.engine.reload_weights(str(folder))
            except WeightLoadError as exc:  # the previous weights are back in place
                raise invalid("path", f"could not load (previous weights restored): {exc}") \
                    from exc
            seconds = time.perf_counter() - started
            await held.share()  # hashing a large checkpoint must not hold generation back
            digest = await self.engine.checksum() if checksum else None
        return WeightsLoadResponse(version=version.label, checksum=digest, seconds=seconds,
                                   path=str(folder))

    async def init_transfer(self, payload) -> None:
        await self._transfer(self.engine.init_weight_transfer_engine(payload))

    async def start_update(self) -> None:
        await self.hold.start(self.gate, on_timeout=self._restore_after_timeout)
        await self._within_update(self.engine.start_weight_update())  # held until finish

    async def update(self, payload) -> None:
        await self._within_update(self.engine.update_weights(payload))

    async def finish_update(self) -> str:
        await self._within_update(self.engine.finish_weight_update(), last=True)
        return self.engine.weights.label

    async def _within_update(self, call, last: bool = False) -> None:
        """Run a step of a started update; if it fails the weights may be half-written:
        restore the last good ones, then release the gate. The `last` step releases the
        gate itself, so the hold's timeout cannot fire between it and the release."""
        if not self.hold.held:
            call.close()
            why = (f"the update timed out after {self.hold.timeout:g} s without a call "
                   "(the last good weights were restored)" if self.hold.timed_out
                   else "none in progress")
            raise ApiError(409, f"no weight update in progress: {why}; call "
                           "/start_weight_update first")
        with self.hold.step():
            try:
                await self._transfer(call)
            except BaseException:
                try:
                    await self.engine.restore_weights()
                finally:
                    await self.hold.stop()
                raise
            if last:
                await self.hold.stop()

    async def _restore_after_timeout(self) -> None:
        """The trainer never finished its update: serve the last good weights again."""
        log.warning("weight update held past its %g s timeout: restoring %s",
                    self.hold.timeout, self.engine.weights.label)
        try:
            await self.engine.restore_weights()
        except Exception:  # the gate must open even so; the engine may be dead
            log.exception("restoring the last good weights after a timed-out update failed")

    async def _transfer(self, call) -> None:
        try:
            await call
        except ApiError:
            raise
        except (TypeError, ValueError) as exc:
            raise invalid("body", str(exc)) from exc
        except Exception as exc:  # any engine failure is a 409 unless the engine died
            if self.engine.dead:
                raise
            raise ApiError(409, f"weight transfer failed: {type(exc).__name__}: {exc}") from exc

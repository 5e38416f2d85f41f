"""The weight service: everything behind the weight routes. All or nothing: the version
reported by /v1/models and /health changes only once new weights are fully in, and every
failure releases the weight gate.

- `load`: reload a safetensors checkpoint folder in place (CPU and GPU). Before anything
  touches the engine: the folder and every file in it must really lie under a
  --weights-root (symlinks resolved), the headers must parse, and a dry run of the model's
  own loader must find every parameter, no unknown tensor and matching shapes. A load
  that still fails half-way reloads the previous checkpoint.
- TRL's NCCL sync steps (`init_transfer`, `start_update`, `update`, `finish_update`),
  forwarded to the engine. A failed step answers 409 and releases the gate; a failed
  update or finish reloads the last checkpoint folder.

Both take the weight gate exclusively (see server/weightgate.py): in-flight generations
finish on the old weights, new ones wait for the new weights.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from server.checkpoint import CheckpointError, read_checkpoint, resolve_folder
from server.engine.engine import Engine, WeightLoadError
from server.errors import ApiError, invalid
from server.weightgate import HeldUpdate, WeightGate
from stepzip.schemas.openai import WeightsLoadResponse


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
        async with self.gate.exclusive():
            try:
                version = await self.engine.reload_weights(str(folder), checksum=checksum)
            except WeightLoadError as exc:  # the previous weights are back in place
                raise invalid("path", f"could not load (previous weights restored): {exc}") \
                    from exc
        return WeightsLoadResponse(version=version.label, checksum=version.checksum,
                                   seconds=time.perf_counter() - started, path=str(folder))

    async def init_transfer(self, payload) -> None:
        await self._transfer(self.engine.init_weight_transfer_engine(payload))

    async def start_update(self) -> None:
        await self.hold.start(self.gate)  # held until finish_update
        try:
            await self._transfer(self.engine.start_weight_update())
        except BaseException:
            await self.hold.stop()
            raise

    async def update(self, payload) -> None:
        await self._within_update(self.engine.update_weights(payload))

    async def finish_update(self) -> str:
        await self._within_update(self.engine.finish_weight_update())
        await self.hold.stop()
        return self.engine.weights.label

    async def _within_update(self, call) -> None:
        """Run a step of a started update; if it fails the weights may be half-written:
        reload the last checkpoint folder, then release the gate."""
        if not self.hold.held:
            call.close()
            raise ApiError(409, "no weight update in progress; call /start_weight_update first")
        try:
            await self._transfer(call)
        except BaseException:
            try:
                await self.engine.restore_weights()
            finally:
                await self.hold.stop()
            raise

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

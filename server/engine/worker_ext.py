"""Methods mixed into vLLM's worker (`worker_extension_cls`), called with `collective_rpc`.

They run in the worker process, where the entropy processor and its store live.
"""

from __future__ import annotations

from server.engine.entropy import current_store


class StepzipWorkerExtension:
    def stepzip_fetch_entropies(
        self, requests: list[tuple[str, int]]
    ) -> dict[str, list[float] | None]:
        """First n entropies for each (key, n), one host copy for the whole batch."""
        store = current_store()
        if store is None:
            return {key: None for key, _ in requests}
        return store.fetch(requests)

    def stepzip_release_entropies(self, keys: list[str]) -> int:
        """Free the entries of requests whose entropies nobody will fetch (aborted)."""
        store = current_store()
        if store is not None:
            store.release(keys)
        return len(keys)

    def stepzip_processor_kind(self) -> str | None:
        store = current_store()
        return None if store is None else str(store.device)

    def stepzip_cpu_placement(self) -> tuple[int, int, list[int]]:
        """(worker pid, its parent's pid: the engine core's, the cores this worker's
        threads are bound to): the server keeps its own processes off those cores
        (server/engine/placement.py)."""
        import os

        from server.engine.placement import process_cpus

        return os.getpid(), os.getppid(), sorted(process_cpus())

    # ---- all-or-nothing weight loads (server/engine/weightcheck.py) ------------------
    def stepzip_check_checkpoint(self, tensors: list[tuple[str, list[int], str]]) -> list[str]:
        """What a load of these (name, shape, dtype) tensors would get wrong; nothing copied."""
        from server.engine.weightcheck import dry_run_load

        tp = self.vllm_config.parallel_config.tensor_parallel_size
        return dry_run_load(self.model_runner.get_model(), tensors, tp_size=tp)

    def stepzip_reload_weights(self, path: str, previous: str) -> str | None:
        """Reload in place; on failure restore `previous` and return the error."""
        from server.engine.weightcheck import reload_or_restore

        return reload_or_restore(self, path, previous)

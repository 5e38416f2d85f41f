"""Methods mixed into vLLM's worker (`worker_extension_cls`), called with `collective_rpc`.

They run in the worker process, where the entropy processor and its store live.
"""

from __future__ import annotations

from server.engine.entropy import current_store


class StepzipWorkerExtension:
    def stepzip_fetch_entropies(
        self, requests: list[tuple[str, int]]
    ) -> tuple[dict[str, list[float] | None], tuple[int, int]]:
        """First n entropies for each (key, n), one host copy for the whole batch; and
        (this worker's data-parallel engine, the entries its store evicted unfetched so
        far), for the eviction metric."""
        store = current_store()
        # vLLM resets data_parallel_rank to 0 in each engine of a dense model; the index
        # keeps the engine's rank.
        engine = self.vllm_config.parallel_config.data_parallel_index
        if store is None:
            return {key: None for key, _ in requests}, (engine, 0)
        return store.fetch(requests), (engine, store.evictions)

    def stepzip_release_entropies(self, keys: list[str]) -> int:
        """Free the entries of requests whose entropies nobody will fetch (aborted)."""
        store = current_store()
        if store is not None:
            store.release(keys)
        return len(keys)

    def stepzip_processor_kind(self) -> str | None:
        store = current_store()
        return None if store is None else str(store.device)

    def stepzip_install_prefill_scoring(self) -> list[str]:
        """Score /v1/score requests by one prefill pass (server/engine/prefill.py);
        -> why it cannot (empty: installed)."""
        from server.engine.prefill import install

        return install(self)

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

    def stepzip_reload_weights(self, path: str) -> str | None:
        """Reload in place; on failure return the error, leaving a runnable model for
        the server to restore (it restores every worker when any failed)."""
        from server.engine.weightcheck import reload_in_place

        return reload_in_place(self, path)

    def stepzip_snapshot_weights(self) -> int:
        """Keep a host copy of the weights (bytes kept): the last good weights while an
        update overwrites weights that no folder holds."""
        from server.engine.weightcheck import host_snapshot

        self.stepzip_snapshot = host_snapshot(self.model_runner.get_model())
        return sum(t.numel() * t.element_size() for t in self.stepzip_snapshot.values())

    def stepzip_restore_weights(self, path: str | None) -> None:
        """Put the last good weights back: reloaded from `path`, or from the host copy."""
        from server.engine.weightcheck import restore_weights

        restore_weights(self, path, getattr(self, "stepzip_snapshot", None))
        self.stepzip_drop_snapshot()

    def stepzip_drop_snapshot(self) -> None:
        self.stepzip_snapshot = None

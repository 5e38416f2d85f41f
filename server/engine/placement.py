"""Keep the server's own processes off the CPU cores that run the model (CPU serving).

vLLM's CPU worker binds its compute threads to cores (VLLM_CPU_OMP_THREADS_BIND; on a
2-core machine `auto` takes core 0), but the API process and the engine-core process may
run anywhere, so the scheduler puts their work (HTTP, detokenizing, stepzip's steps and
JSON, the engine core's busy-wait for the worker) on the worker's core too, and every
slice they take there is a slice the model does not get. Pinning them to the cores the
workers do not use removes that. Linux only; a no-op where the workers use every core
this process may use, or where affinity cannot be set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger("stepzip.engine")


def frontend_cpus(allowed: Iterable[int], worker_cpus: Iterable[int]) -> set[int]:
    """The cores left for the server's own processes: `allowed` minus the workers'."""
    return set(allowed) - set(worker_cpus)


def thread_ids(pid: int) -> list[int]:
    """Every thread of `pid` (Linux keeps affinity per thread)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def process_cpus(pid: int = 0) -> set[int]:
    """The cores any thread of `pid` (0: this process) may run on. Not the main thread's
    mask alone: OpenMP binds each compute thread to its own core, so a worker bound to
    cores 0-6 has its main thread on core 0 only and the other six threads elsewhere."""
    pid = pid or os.getpid()
    cpus: set[int] = set()
    for tid in thread_ids(pid):
        try:
            cpus |= os.sched_getaffinity(tid)
        except OSError:  # the thread ended meanwhile
            continue
    return cpus or os.sched_getaffinity(pid)


def pin_process(pid: int, cpus: set[int]) -> int:
    """Set the affinity of every thread of `pid` (new threads inherit their creator's).
    Returns how many threads were pinned."""
    pinned = 0
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, cpus)
            pinned += 1
        except OSError:  # the thread ended meanwhile, or we may not touch it
            continue
    return pinned


def keep_frontend_off_workers(placements: list[tuple[int, int, list[int]]]) -> str:
    """`placements`: (worker pid, engine-core pid, worker cores) per worker. Pins this
    process and each engine-core process to the remaining cores; returns what it did."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no CPU affinity on this platform)"
    me = os.getpid()
    if any(worker == me for worker, _, _ in placements):
        return "not pinned: the model runs inside the API process"
    worker_cpus = {cpu for _, _, cpus in placements for cpu in cpus}
    cpus = frontend_cpus(os.sched_getaffinity(0), worker_cpus)
    if not cpus:
        return (f"not pinned: the workers use every core this server may use "
                f"({sorted(worker_cpus)})")
    workers = {worker for worker, _, _ in placements}
    cores = {core for _, core, _ in placements if core > 1 and core not in workers}
    pids = [me, *sorted(cores - {me})]
    threads = sum(pin_process(pid, cpus) for pid in pids)
    return (f"API and engine-core processes ({threads} threads) pinned to cores "
            f"{sorted(cpus)}; model workers on {sorted(worker_cpus)}")

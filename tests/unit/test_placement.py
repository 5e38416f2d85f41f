"""Frontend pinning (CPU serving): the API and engine-core processes leave the workers'
cores alone. Run against real processes and real affinity masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server.engine.placement import (
    frontend_cpus,
    keep_frontend_off_workers,
    pin_process,
    process_cpus,
)

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")


def test_frontend_gets_the_cores_the_workers_do_not_use() -> None:
    assert frontend_cpus({0, 1, 2, 3}, {0, 1}) == {2, 3}
    assert frontend_cpus({0, 1}, {0, 1}) == set()
    assert frontend_cpus({0, 1}, {5}) == {0, 1}


def _child() -> subprocess.Popen:
    # A process with several threads, like the engine core.
    code = ("import threading, time\n"
            "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() "
            "for _ in range(3)]\nprint('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


@linux
def test_pin_process_sets_every_thread() -> None:
    cpu = min(os.sched_getaffinity(0))
    proc = _child()
    try:
        assert pin_process(proc.pid, {cpu}) == 4
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == {cpu}
    finally:
        proc.kill()
        proc.wait()


@linux
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_worker_cores_are_every_threads_not_the_main_threads() -> None:
    # Like vLLM's CPU worker under OpenMP binding: the main thread on the first core of
    # its list, each other compute thread on its own core.
    first, second = sorted(os.sched_getaffinity(0))[:2]
    code = ("import os, threading, time\n"
            f"os.sched_setaffinity(0, {{{first}}})\n"
            "ready = threading.Event()\n"
            "def bound():\n"
            f"    os.sched_setaffinity(0, {{{second}}})\n"
            "    ready.set()\n"
            "    time.sleep(60)\n"
            "threading.Thread(target=bound, daemon=True).start()\n"
            "ready.wait()\nprint('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert os.sched_getaffinity(proc.pid) == {first}  # what the old check saw
        assert process_cpus(proc.pid) == {first, second}
    finally:
        proc.kill()
        proc.wait()
    assert process_cpus() >= os.sched_getaffinity(0)


@linux
def test_nothing_pinned_when_workers_use_every_core() -> None:
    mine = os.sched_getaffinity(0)
    message = keep_frontend_off_workers([(os.getpid() + 1, os.getpid(), sorted(mine))])
    assert message.startswith("not pinned: the workers use every core")
    assert os.sched_getaffinity(0) == mine


@linux
def test_model_inside_this_process_is_never_pinned_away() -> None:
    message = keep_frontend_off_workers([(os.getpid(), os.getppid(), [0])])
    assert "inside the API process" in message


@linux
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_engine_core_and_api_pinned_off_the_worker_core() -> None:
    cores = sorted(os.sched_getaffinity(0))
    worker_core, rest = cores[0], set(cores[1:])
    core_proc, worker = _child(), _child()
    # In a child of ours, so this test's own process keeps its affinity.
    code = ("import os, sys, json\nfrom server.engine.placement import keep_frontend_off_workers\n"
            f"print(keep_frontend_off_workers([({worker.pid}, {core_proc.pid}, [{worker_core}])]))\n"
            "print(json.dumps(sorted(os.sched_getaffinity(0))))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__))))).stdout
        message, mask = out.strip().splitlines()
        assert "pinned to cores" in message
        assert set(json.loads(mask)) == rest
        for tid in os.listdir(f"/proc/{core_proc.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == rest
        assert os.sched_getaffinity(worker.pid) == set(cores)  # the worker is left alone
    finally:
        for p in (core_proc, worker):
            p.kill()
            p.wait()

"""Bounded grading: every math-verify/sympy call runs in a child process with a deadline.

math-verify can run without end on a short string (a gold of ``9^{9^{9}}`` makes sympy
compute a 370-million-digit integer in C, where no signal reaches it), and its own
timeout relies on SIGALRM, which works only on a process's main thread. So nothing here
grades in the caller's process: a pool of child processes does, each call with a hard
deadline. A child still busy at the deadline is killed and replaced in the background,
and the call's outcome is *ungradable* (with the reason), a third outcome besides right
and wrong that a reward counts as not correct.

The children run ``stepzip.grading`` (pure, unbounded) and nothing else; the parent keeps
an LRU of results and of values that already ran out of time once, so one hostile gold
answer graded against 14 samples costs one deadline, not 14.

    >>> from stepzip.grader import grade
    >>> grade("... so the answer is \\\\frac{1}{2}.", "0.5").outcome
    'correct'
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

log = logging.getLogger("stepzip.grader")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_WORKERS = 2
# A child's address space: a runaway big-integer or expansion fails with MemoryError at
# this size instead of taking the machine's memory.
CHILD_MEMORY_BYTES = 4 * 2**30
# The child interrupts itself at the deadline (SIGALRM, which reaches Python code); the
# parent kills it this much later if it did not answer (C code that ignores signals).
KILL_GRACE_S = 0.25
# How long a call may wait for a free, started child before it is ungradable.
ACQUIRE_WAIT_S = 60.0
CACHE_SIZE = 8192

Outcome = Literal["correct", "wrong", "ungradable", "no_gold"]


@dataclass(frozen=True)
class Grade:
    """One graded answer. ``correct`` is None unless the outcome is correct or wrong."""
    extracted: str | None
    correct: bool | None
    outcome: Outcome
    reason: str | None = None  # why it is ungradable

    @property
    def as_pair(self) -> tuple[str | None, bool | None]:
        return self.extracted, self.correct


class GradingTimeout(Exception):
    """The call ran past its deadline; the child that ran it was interrupted or killed."""


class GradingFailed(Exception):
    """The child could not run the call (out of memory, crashed, none available)."""


class Grader:
    """A pool of grading child processes. Thread-safe; calls block their thread only.

    ``workers`` children grade at once; ``timeout`` is the per-call deadline in seconds.
    """

    def __init__(self, workers: int = DEFAULT_WORKERS, timeout: float = DEFAULT_TIMEOUT_S):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.workers, self.timeout = workers, timeout
        self._idle: list[_Child] = []
        self._running: set[_Child] = set()  # every live child, idle or busy
        self._cond = threading.Condition()  # guards all of the pool's state
        self._starting = self._busy = 0
        self._closed = False
        self._spawner: threading.Thread | None = None
        self._spawn_requests: queue.SimpleQueue[bool] = queue.SimpleQueue()
        # Keys are digests, so a 100k-character completion costs 16 bytes here.
        self._results: OrderedDict[tuple, Any] = OrderedDict()  # (fn, *digests) -> value
        self._threads = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="stepzip-grade")
        self.counts: dict[str, int] = {"correct": 0, "wrong": 0, "ungradable": 0,
                                       "no_gold": 0, "restarts": 0}
        self.on_grade: Callable[[Grade], None] | None = None  # e.g. a metrics counter

    # ---- pool ---------------------------------------------------------------------

    def start(self) -> Grader:
        """Start the children in the background (idempotent); calls wait for them."""
        with self._cond:
            missing = self.workers - len(self._idle) - self._starting - self._busy
            for _ in range(max(0, missing)):
                self._spawn_locked()
        return self

    def wait_ready(self, timeout: float = ACQUIRE_WAIT_S) -> bool:
        """Block until every child has started (False if not within ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.start()
            while len(self._idle) + self._busy < self.workers:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
        return True

    def _spawn_locked(self) -> None:
        self._starting += 1
        if self._spawner is None:
            self._spawner = threading.Thread(target=self._spawn_loop, daemon=True,
                                             name="stepzip-grade-spawner")
            self._spawner.start()
        self._spawn_requests.put(True)

    def _spawn_loop(self) -> None:
        """Forks every child from this one long-lived thread: Linux's parent-death signal
        follows the thread that forked, so a child outlives no grader, yet none dies with
        a short-lived thread."""
        while self._spawn_requests.get():
            try:
                child = _Child.launch()
            except Exception:
                log.exception("could not start a grading process")
                self._started(None)
                continue
            threading.Thread(target=self._await_ready, args=(child,), daemon=True,
                             name="stepzip-grade-ready").start()

    def _await_ready(self, child: _Child) -> None:
        try:
            child.wait_ready()
        except GradingFailed:
            if not self._closed:
                log.exception("a grading process did not start")
            child.kill()
            child = None
        self._started(child)

    def _started(self, child: _Child | None) -> None:
        with self._cond:
            self._starting -= 1
            if child is not None and not self._closed:
                self._idle.append(child)
                self._running.add(child)
            elif child is not None:
                child.kill()
            self._cond.notify_all()

    def _acquire(self) -> _Child:
        deadline = time.monotonic() + ACQUIRE_WAIT_S
        with self._cond:
            while not self._idle:
                left = deadline - time.monotonic()
                if self._closed:
                    raise GradingFailed("the grader is closed")
                if left <= 0:
                    raise GradingFailed(f"no grading process free within {ACQUIRE_WAIT_S:.0f} s")
                self.start()  # replaces children that failed to start
                self._cond.wait(left)
            self._busy += 1
            return self._idle.pop()

    def _release(self, child: _Child | None) -> None:
        """Back to the pool; None = the child was killed: start its replacement."""
        with self._cond:
            self._busy -= 1
            if child is None:
                self.counts["restarts"] += 1
                if not self._closed:
                    self._spawn_locked()
            elif self._closed:
                child.kill()
            else:
                self._idle.append(child)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            children, self._idle, self._running = list(self._running), [], set()
            self._cond.notify_all()
        self._spawn_requests.put(False)
        for child in children:  # a busy one's caller then fails at once
            child.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # ---- calls --------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """``fn(*args)`` in a child, within ``timeout`` seconds (default: the pool's).

        ``fn`` must be a module-level function (it is pickled by name). Raises
        GradingTimeout past the deadline and GradingFailed when the child could not run
        it; any exception ``fn`` raises is raised here.
        """
        timeout = self.timeout if timeout is None else timeout
        child = self._acquire()
        try:
            status, value = child.run(fn, args, timeout)
        except (GradingTimeout, GradingFailed):
            with self._cond:
                self._running.discard(child)
            child.kill()
            child = None
            raise
        finally:
            self._release(child)
        if status == "timeout":
            raise GradingTimeout(f"ran past the {timeout:g} s grading deadline")
        if status == "memory":
            raise GradingFailed("ran out of memory")
        if status == "error":
            raise value
        return value

    def grade(self, completion: str, gold: str | None, timeout: float | None = None,
              blame: _Blame | None = None) -> Grade:
        """Extract the answer a completion commits to and compare it with ``gold``."""
        from stepzip import grading

        # One deadline for both calls: extraction's time is taken from the comparison's.
        budget = self.timeout if timeout is None else timeout
        started = time.monotonic()
        extracted = self._bounded(grading.extract_answer, completion, timeout=budget,
                                  blame=blame)
        if isinstance(extracted, _Ungradable):
            return self._counted(Grade(None, None, "ungradable", extracted.reason))
        if gold is None:
            return self._counted(Grade(extracted, None, "no_gold"))
        left = max(budget - (time.monotonic() - started), 0.05)
        return self._counted(self._compare(extracted, gold, left, blame))

    def match(self, pred: str | None, gold: str, timeout: float | None = None) -> Grade:
        """Whether an already extracted answer equals ``gold`` (``\\frac12`` == 0.5)."""
        return self._counted(self._compare(pred, gold, timeout, None))

    def grade_many(self, pairs: Sequence[tuple[str, str | None]],
                   timeout: float | None = None) -> list[Grade]:
        """Grade (completion, gold) pairs concurrently, up to the pool size. Within the
        batch, a value that ran out of time against two different partners (a hostile
        gold against two samples) makes the rest of its pairs ungradable at once."""
        blame = _Blame()
        if len(pairs) <= 1:
            return [self.grade(c, g, timeout, blame) for c, g in pairs]
        futures = [self._threads.submit(self.grade, c, g, timeout, blame) for c, g in pairs]
        return [f.result() for f in futures]

    async def agrade_many(self, pairs: Sequence[tuple[str, str | None]],
                          timeout: float | None = None) -> list[Grade]:
        """``grade_many`` for async code: the event loop only waits."""
        import asyncio

        loop, blame = asyncio.get_running_loop(), _Blame()
        return list(await asyncio.gather(*(
            loop.run_in_executor(self._threads, self.grade, c, g, timeout, blame)
            for c, g in pairs)))

    def _compare(self, pred: str | None, gold: str, timeout: float | None,
                 blame: _Blame | None) -> Grade:
        from stepzip import grading

        if pred is None:
            return Grade(None, False, "wrong")
        same = self._bounded(grading.answers_match, pred, gold, timeout=timeout, blame=blame)
        if isinstance(same, _Ungradable):
            return Grade(pred, None, "ungradable", same.reason)
        return Grade(pred, bool(same), "correct" if same else "wrong")

    def _bounded(self, fn: Callable[..., Any], *args: str, timeout: float | None,
                 blame: _Blame | None) -> Any:
        """``call`` with a memo of outcomes (deadline hits included: the same pair runs
        out of time again) and the batch's blame for values that run out of time."""
        digests = [_digest(a) for a in args]
        key = (fn.__module__, fn.__qualname__, *digests)
        with self._cond:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        culprit = blame.culprit(digests) if blame is not None else None
        if culprit is not None:
            return _Ungradable(f"{culprit} ran past the grading deadline against other "
                               f"answers of this batch")
        try:
            value = self.call(fn, *args, timeout=timeout)
        except GradingTimeout as exc:
            value = _Ungradable(str(exc))
            if blame is not None:
                blame.record(args, digests)
        except GradingFailed as exc:  # the pool's state, not the pair's: not memoised
            return _Ungradable(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in grading is an outcome, not a 500
            value = _Ungradable(f"grading raised {type(exc).__name__}: {exc}")
        with self._cond:
            _remember(self._results, key, value)
        return value

    def _counted(self, g: Grade) -> Grade:
        with self._cond:
            self.counts[g.outcome] += 1
        if self.on_grade is not None:
            self.on_grade(g)
        return g


@dataclass(frozen=True)
class _Ungradable:
    reason: str


class _Blame:
    """One batch's record of the values that ran out of time and against what. A value is
    the culprit once it ran out of time on its own (extraction) or against two different
    partners; the partner that met one hostile value is not blamed. Kept per batch: a
    common answer ("7") meets many hostile golds over a server's life."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partners: dict[bytes, tuple[str, set[bytes]]] = {}

    def record(self, args: Sequence[str], digests: Sequence[bytes]) -> None:
        with self._lock:
            for a, d in zip(args, digests):
                _, partners = self._partners.get(d, ("", set()))
                self._partners[d] = (_short(a), partners | (set(digests) - {d}))

    def culprit(self, digests: Sequence[bytes]) -> str | None:
        with self._lock:
            for d in digests:
                if d in self._partners:
                    text, partners = self._partners[d]
                    if len(digests) == 1 or not partners or len(partners) >= 2:
                        return text
        return None


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---- the child process -------------------------------------------------------------

class _Child:
    """One grading process, talking pickles over a socket pair."""

    def __init__(self, process: subprocess.Popen, conn: Connection):
        self.process, self.conn = process, conn

    @classmethod
    def launch(cls) -> _Child:
        """Start ``python -c serve(fd)``: a fresh interpreter, not a fork of this
        process, which may hold vLLM's threads."""
        ours, theirs = socket.socketpair()
        code = "import sys; from stepzip.grader import serve; serve(int(sys.argv[1]))"
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL, close_fds=True, env=_child_env())
        theirs.close()
        return cls(process, Connection(ours.detach()))

    def wait_ready(self) -> None:
        """Until the child has imported math-verify (its first call must not pay it)."""
        try:
            if self.conn.poll(ACQUIRE_WAIT_S) and self.conn.recv() == "ready":
                return
        except (EOFError, OSError):
            pass
        raise GradingFailed("a grading process did not start")

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float) -> tuple[str, Any]:
        try:
            self.conn.send((fn, args, timeout))
            if not self.conn.poll(timeout + KILL_GRACE_S):
                raise GradingTimeout(f"ran past the {timeout:g} s grading deadline (killed)")
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError, pickle.PicklingError) as exc:
            raise GradingFailed(f"the grading process failed: {type(exc).__name__}") from exc

    def kill(self) -> None:
        """SIGKILL now; the exit is reaped in the background, so no caller waits for it."""
        try:
            self.process.kill()
        except OSError:
            pass
        self.conn.close()
        threading.Thread(target=self.process.wait, daemon=True,
                         name="stepzip-grade-reap").start()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The children need the same imports as the parent, wherever it was started from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
    return env


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside the child; BaseException so sympy's `except Exception`
    handlers do not swallow it."""


def serve(fd: int) -> None:
    """The child's loop: receive (fn, args, timeout), answer (status, value)."""
    _die_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    from stepzip import grading

    grading.answers_match("\\frac{1}{2}", "0.5")  # pay the imports and lazy set-up first

    def alarm(signum, frame):
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, alarm)
    conn = Connection(fd)
    conn.send("ready")
    while True:
        try:
            fn, args, timeout = conn.recv()
        except (EOFError, OSError):
            return
        status, value = _run_one(fn, args, timeout)
        try:
            message = pickle.dumps((status, value))
        except Exception as exc:  # noqa: BLE001 - an unpicklable result is the call's error
            message = pickle.dumps(("error", RuntimeError(
                f"the result of {getattr(fn, '__name__', fn)!s} cannot be sent back: {exc}")))
        conn.send_bytes(message)


def _run_one(fn: Callable[..., Any], args: tuple, timeout: float) -> tuple[str, Any]:
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return "ok", fn(*args)
    except _SoftTimeout:
        return "timeout", None
    except MemoryError:
        return "memory", None
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return "error", exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _die_with_parent() -> None:
    """Linux: the kernel kills the child when the parent dies, even mid-computation."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- the process-wide default ------------------------------------------------------

_default: Grader | None = None
_default_lock = threading.Lock()


def configure(workers: int | None = None, timeout: float | None = None) -> Grader:
    """(Re)create the process-wide grader with these settings; None = keep / default.
    ``STEPZIP_GRADING_TIMEOUT`` and ``STEPZIP_GRADING_WORKERS`` set the defaults."""
    global _default
    with _default_lock:
        old = _default
        _default = Grader(
            workers=workers or (old.workers if old else _env("STEPZIP_GRADING_WORKERS",
                                                              DEFAULT_WORKERS, int)),
            timeout=timeout or (old.timeout if old else _env("STEPZIP_GRADING_TIMEOUT",
                                                              DEFAULT_TIMEOUT_S, float)))
    if old is not None:
        old.close()
    return _default.start()  # warm by the first call


def default_grader() -> Grader:
    """The process-wide grader, created on first use."""
    with _default_lock:
        current = _default
    return current if current is not None else configure()


def _env(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get(name)
    return kind(raw) if raw else default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


def grade(completion: str, gold: str | None, timeout: float | None = None) -> Grade:
    """Grade one completion with the process-wide grader (bounded)."""
    return default_grader().grade(completion, gold, timeout)


def grade_many(pairs: Sequence[tuple[str, str | None]],
               timeout: float | None = None) -> list[Grade]:
    """Grade (completion, gold) pairs concurrently with the process-wide grader."""
    return default_grader().grade_many(pairs, timeout)


def match(pred: str | None, gold: str, timeout: float | None = None) -> Grade:
    """Compare an extracted answer with the gold, bounded."""
    return default_grader().match(pred, gold, timeout)


def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Run a pure module-level function in a grading child, bounded (see Grader.call)."""
    return default_grader().call(fn, *args, timeout=timeout)

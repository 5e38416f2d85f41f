"""Python client for one stepzip server or several replicas of it.

A session (start a server first: `stepzip serve`):

    >>> from clients.client import StepzipClient
    >>> client = StepzipClient("http://127.0.0.1:8000")
    >>> client.wait_ready(timeout=300)
    >>> out = client.compress(["Tom has 3 apples and buys 4 more. How many apples?"],
    ...                       answers=["7"], max_tokens=128)
    >>> trace = out.results[0].traces[0]
    >>> [round(s.entropy_sum, 2) for s in trace.steps]          # step entropies (nats)
    >>> trace.variants[0].compressed_text, trace.variants[0].reduction

Several replicas (a list, or one comma-separated string, e.g. straight from `--url`):

    >>> from stepzip.data import load_problems
    >>> gsm8k = load_problems("gsm8k", "test", limit=100)
    >>> client = StepzipClient("http://10.0.0.1:8000,http://10.0.0.2:8000")
    >>> out = client.compress([p.question for p in gsm8k], ids=[p.id for p in gsm8k],
    ...                       max_tokens=128, progress=lambda done, total: print(done, total))
    >>> [r.completed for r in client.replicas]                   # requests each answered

Each request goes to the replica with the fewest requests outstanding from this client
(call it from several threads to use them all; `compress` does so itself when the
problems exceed one request). A replica that fails at the transport level or answers
502/503/504 is set aside for `retry_after` seconds; that request (or one answered 500,
as a replica shutting down answers its in-flight work) is sent again to another replica,
so a result is returned exactly once or the call raises. 4xx errors are the request's
fault and are raised at once. Weight loads go to every replica.

All HTTP goes through `_send`; `_request` picks the replica and retries; error
responses become `StepzipError` carrying the server's field/reason details.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Self

import httpx

from stepzip.schemas import compress as schemas
from stepzip.schemas import score as score_schemas

# Answers after which the request goes to another replica: 502-504 say the replica is
# down or starting; 500 is also what a replica shutting down gives its in-flight requests.
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
DEFAULT_MAX_PROBLEMS = 64  # the server's default --max-problems, if /health does not say


class StepzipError(RuntimeError):
    def __init__(self, status: int, body: dict | str, url: str | None = None):
        self.status, self.body, self.url = status, body, url
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):  # vLLM's body on the OpenAI routes
            message = message.get("message", message)
        details = body.get("details") if isinstance(body, dict) else None
        if details:
            message = f"{message} ({'; '.join(_detail(d) for d in details)})"
        super().__init__(f"HTTP {status}: {message}")


class NoReplicaLeft(RuntimeError):
    """Every replica failed this request; `__cause__` is the last failure."""


def _detail(d) -> str:
    return f"{d.get('field')}: {d.get('reason')}" if isinstance(d, dict) else str(d)


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (trailing slashes dropped, order kept)."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for item in items for u in str(item).split(",") if u.strip()]
    if not out:
        raise ValueError("no server URL given")
    for u in out:
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {u!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"server URLs repeat: {out}")
    return out


@dataclass
class Replica:
    url: str
    http: httpx.Client = field(repr=False)
    outstanding: int = 0       # requests in flight from this client
    completed: int = 0         # requests it answered (any status below 500)
    failures: int = 0          # transport errors / 500, 502-504
    down_until: float = 0.0    # monotonic time before which it is not chosen


class StepzipClient:
    def __init__(self, urls: str | Sequence[str] = "http://127.0.0.1:8000",
                 api_key: str | None = None, timeout: float = 600.0,
                 retry_after: float = 30.0, max_problems: int | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.replicas = [Replica(u, httpx.Client(base_url=u, headers=headers, timeout=timeout))
                         for u in parse_urls(urls)]
        self.retry_after = retry_after
        self.max_problems = max_problems  # a cap; the servers' own limit applies too
        self._server_limit: int | None = None  # from /health, asked once
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    # ---- HTTP ----------------------------------------------------------------------
    def _send(self, replica: Replica, method: str, path: str, **kw) -> dict:
        """The one place that does HTTP."""
        response = replica.http.request(method, path, **kw)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise StepzipError(response.status_code, body, replica.url)
        return response.json()

    def _pick(self, tried: set[str]) -> Replica | None:
        """Least outstanding among untried replicas; set-aside ones only if nothing else."""
        now = time.monotonic()
        candidates = [r for r in self.replicas if r.url not in tried]
        if not candidates:
            return None
        up = [r for r in candidates if r.down_until <= now]
        return min(up or candidates, key=lambda r: (r.outstanding, r.down_until))

    def _request(self, method: str, path: str, **kw) -> dict:
        """Send to the least-loaded replica; on a replica failure, the next one."""
        tried: set[str] = set()
        last: Exception | None = None
        while True:
            with self._lock:
                replica = self._pick(tried)
                if replica is None:
                    break
                replica.outstanding += 1
            tried.add(replica.url)
            try:
                result = self._send(replica, method, path, **kw)
            except (httpx.TransportError, StepzipError) as exc:
                if not self._set_aside(replica, exc):
                    raise
                last = exc
                continue
            finally:
                with self._lock:
                    replica.outstanding -= 1
            with self._lock:
                replica.completed += 1
                replica.down_until = 0.0
            return result
        if len(self.replicas) == 1 and last is not None:
            raise last  # one server: its own error, as before replicas existed
        raise NoReplicaLeft(f"{method} {path} failed on every replica: "
                            f"{', '.join(self.urls)}; last: {last}") from last

    def _set_aside(self, replica: Replica, exc: Exception) -> bool:
        """Whether `exc` is the replica's fault (then it rests for `retry_after` seconds)."""
        with self._lock:
            if isinstance(exc, StepzipError) and exc.status not in RETRYABLE_STATUS:
                replica.completed += 1  # it answered; the request was refused
                return False
            replica.failures += 1
            if not (isinstance(exc, StepzipError) and exc.status == 500):
                replica.down_until = time.monotonic() + self.retry_after  # one 500: no rest
            return True

    def _each(self, method: str, path: str, **kw) -> dict[str, dict]:
        """The same request to every replica (weight loads, health), in order."""
        return {r.url: self._send(r, method, path, **kw) for r in self.replicas}

    # ---- API -----------------------------------------------------------------------
    def health(self) -> dict:
        """Health of the least-loaded healthy replica (one server: its /health)."""
        return self._request("GET", "/health")

    def replica_health(self) -> dict[str, dict | str]:
        """Per replica: its /health body, or the error that answered instead."""
        out: dict[str, dict | str] = {}
        for r in self.replicas:
            try:
                out[r.url] = self._send(r, "GET", "/health")
            except (httpx.TransportError, StepzipError) as exc:
                out[r.url] = f"{type(exc).__name__}: {exc}"
        return out

    def wait_ready(self, timeout: float = 300.0, poll: float = 1.0) -> dict:
        """Poll /health until every replica's engine is ready (raises on start-up failure
        or timeout); returns the first replica's health."""
        deadline = time.monotonic() + timeout
        ready: dict[str, dict] = {}
        while True:
            for r in self.replicas:
                if r.url in ready:
                    continue
                try:
                    ready[r.url] = self._send(r, "GET", "/health")
                except StepzipError as exc:
                    if isinstance(exc.body, dict) and exc.body.get("status") == "failed":
                        raise
                except httpx.TransportError:
                    pass
            if len(ready) == len(self.replicas):
                return ready[self.replicas[0].url]
            if time.monotonic() > deadline:
                waiting = [u for u in self.urls if u not in ready]
                raise TimeoutError(f"server not ready after {timeout:.0f} s: {waiting}")
            time.sleep(poll)

    def models(self) -> dict:
        return self._request("GET", "/v1/models")

    def compress_request(self, request: schemas.CompressRequest, *,
                         progress: Callable[[int, int], None] | None = None,
                         concurrency: int | None = None) -> schemas.CompressResponse:
        """One request, or, beyond `max_problems`, chunks of it sent concurrently (to
        every replica) and merged in order. `progress(problems_done, total)` is called
        after each chunk. Merged timings are the server's, summed over chunks (they run
        concurrently, so the sum exceeds the call's wall time, which the caller measures)."""
        problems = request.problems
        size = self.problems_per_request()
        chunks = [problems[i:i + size] for i in range(0, len(problems), size)]
        if len(chunks) == 1:
            out = self._compress_one(request)
            if progress:
                progress(len(problems), len(problems))
            return out
        done = [0]
        done_lock = threading.Lock()

        def one(chunk: list[schemas.Problem]) -> schemas.CompressResponse:
            out = self._compress_one(request.model_copy(update={"problems": chunk}))
            if progress:
                with done_lock:
                    done[0] += len(chunk)
                    progress(done[0], len(problems))
            return out

        workers = concurrency or 2 * len(self.replicas)
        with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            parts = list(pool.map(one, chunks))
        return merge_responses(parts)

    def problems_per_request(self) -> int:
        """min(max_problems, the servers' --max-problems over replicas that answer)."""
        if self._server_limit is None:
            limits = [h.get("max_problems") for h in self.replica_health().values()
                      if isinstance(h, dict)]
            known = [n for n in limits if isinstance(n, int) and n > 0]
            self._server_limit = min(known) if known else DEFAULT_MAX_PROBLEMS
        return max(1, min(self.max_problems or self._server_limit, self._server_limit))

    def _compress_one(self, request: schemas.CompressRequest) -> schemas.CompressResponse:
        body = request.model_dump(mode="json", exclude_none=True)
        return schemas.CompressResponse.model_validate(
            self._request("POST", "/v1/compress", json=body))

    def compress(self, problems: Sequence[str], *, answers: Sequence[str | None] | None = None,
                 ids: Sequence[str | None] | None = None,
                 variants: Sequence[dict] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 concurrency: int | None = None, **options) -> schemas.CompressResponse:
        """Compress reasoning for plain problem strings (any number: batched beyond the
        per-request limit); options are CompressRequest fields or Sampling fields
        (max_tokens, temperature, top_p, top_k, seed, n)."""
        answers = answers or [None] * len(problems)
        ids = ids or [None] * len(problems)
        sampling_keys = set(schemas.Sampling.model_fields)
        sampling = {k: options.pop(k) for k in list(options) if k in sampling_keys}
        request = schemas.CompressRequest(
            problems=[schemas.Problem(text=p, answer=a, id=i)
                      for p, a, i in zip(problems, answers, ids)],
            sampling=schemas.Sampling(**sampling),
            variants=[schemas.VariantSpec(**v) for v in variants] if variants
            else [schemas.VariantSpec()],
            **options)
        return self.compress_request(request, progress=progress, concurrency=concurrency)

    def score_request(self, request: score_schemas.ScoreRequest, *,
                      concurrency: int | None = None) -> score_schemas.ScoreResponse:
        """POST /v1/score; beyond the per-request limit, chunks of pairs sent
        concurrently (to every replica) and merged in order, as `compress_request` does."""
        size = self.problems_per_request()
        chunks = [request.pairs[i:i + size] for i in range(0, len(request.pairs), size)]

        def one(pairs: list[score_schemas.Pair]) -> score_schemas.ScoreResponse:
            body = request.model_copy(update={"pairs": pairs}).model_dump(
                mode="json", exclude_none=True)
            return score_schemas.ScoreResponse.model_validate(
                self._request("POST", "/v1/score", json=body))

        if len(chunks) == 1:
            return one(chunks[0])
        workers = concurrency or 2 * len(self.replicas)
        with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            parts = list(pool.map(one, chunks))
        merged = merge_responses(parts)
        return score_schemas.ScoreResponse(**dict(merged))

    def score(self, problems: Sequence[str], reasonings: Sequence[str | list[int]], *,
              answers: Sequence[str | None] | None = None,
              ids: Sequence[str | None] | None = None,
              variants: Sequence[dict] | None = None,
              concurrency: int | None = None, **options) -> score_schemas.ScoreResponse:
        """Score existing reasoning: `reasonings[i]` is the model's completion for
        `problems[i]`, as text or as its token ids (exact). Options are ScoreRequest
        fields (answer, return_tokens, ...)."""
        if len(reasonings) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(reasonings)} reasonings")
        answers = answers or [None] * len(problems)
        ids = ids or [None] * len(problems)
        request = score_schemas.ScoreRequest(
            pairs=[score_schemas.Pair(problem=p, answer=a, id=i, **(
                {"reasoning": r} if isinstance(r, str) else {"reasoning_ids": list(r)}))
                   for p, r, a, i in zip(problems, reasonings, answers, ids)],
            variants=[schemas.VariantSpec(**v) for v in variants] if variants
            else [schemas.VariantSpec()],
            **options)
        return self.score_request(request, concurrency=concurrency)

    def completions(self, body: dict) -> dict:
        """POST /v1/completions with a raw OpenAI/vLLM-shaped body (the trainer's rollouts)."""
        return self._request("POST", "/v1/completions", json=body)

    def load_weights(self, path, checksum: bool = True) -> dict:
        """Reload a checkpoint folder into every replica's engine (the path must be
        readable by each); returns the first replica's answer plus `replicas`, every
        replica's answer by URL."""
        answers = self._each("POST", "/v1/weights/load",
                             json={"path": str(path), "checksum": checksum})
        first = dict(answers[self.replicas[0].url])
        if len(answers) > 1:
            first["replicas"] = answers
        return first

    def weight_version(self) -> str | None:
        """The served weight version; with replicas that disagree, theirs joined by ','."""
        versions = []
        for r in self.replicas:
            data = self._send(r, "GET", "/v1/models").get("data") or [{}]
            versions.append(data[0].get("weight_version"))
        if len(set(versions)) == 1:
            return versions[0]
        return ",".join(str(v) for v in versions)

    def close(self) -> None:
        for r in self.replicas:
            r.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_responses(parts: Sequence[schemas.CompressResponse]) -> schemas.CompressResponse:
    """Chunk responses -> one, results in chunk order; usage and timings summed (timings
    then add up time the requests spent side by side: summed request time, not wall)."""
    usage = schemas.Usage(**{k: sum(getattr(p.usage, k) for p in parts)
                             for k in schemas.Usage.model_fields})
    timings = schemas.Timings(**{k: sum(getattr(p.timings, k) for p in parts)
                                 for k in schemas.Timings.model_fields})
    return schemas.CompressResponse(model=parts[0].model, delimiter=parts[0].delimiter,
                                    results=[r for p in parts for r in p.results],
                                    usage=usage, timings=timings,
                                    notes=list(dict.fromkeys(n for p in parts for n in p.notes)))

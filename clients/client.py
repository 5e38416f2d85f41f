"""Python client for a stepzip server.

A session (start a server first: `stepzip serve`):

    >>> from clients.client import StepzipClient
    >>> client = StepzipClient("http://127.0.0.1:8000")
    >>> client.wait_ready(timeout=300)
    >>> out = client.compress(["Tom has 3 apples and buys 4 more. How many apples?"],
    ...                       answers=["7"], max_tokens=128)
    >>> trace = out.results[0].traces[0]
    >>> [round(s.entropy_sum, 2) for s in trace.steps]          # step entropies (nats)
    >>> trace.variants[0].compressed_text, trace.variants[0].reduction

All HTTP goes through `_request`, which turns error responses into `StepzipError`
carrying the server's field/reason details.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from stepzip.schemas import compress as schemas


class StepzipError(RuntimeError):
    def __init__(self, status: int, body: dict | str):
        self.status, self.body = status, body
        message = body.get("error", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class StepzipClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                 timeout=timeout)

    def _request(self, method: str, path: str, **kw) -> dict:
        response = self.http.request(method, path, **kw)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise StepzipError(response.status_code, body)
        return response.json()

    def health(self) -> dict:
        return self._request("GET", "/health")

    def wait_ready(self, timeout: float = 300.0, poll: float = 1.0) -> dict:
        """Poll /health until the engine is ready (raises on start-up failure/timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except StepzipError as exc:
                if isinstance(exc.body, dict) and exc.body.get("status") == "failed":
                    raise
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout:.0f} s")
            time.sleep(poll)

    def models(self) -> dict:
        return self._request("GET", "/v1/models")

    def compress_request(self, request: schemas.CompressRequest) -> schemas.CompressResponse:
        body = request.model_dump(mode="json", exclude_none=True)
        return schemas.CompressResponse.model_validate(
            self._request("POST", "/v1/compress", json=body))

    def compress(self, problems: Sequence[str], *, answers: Sequence[str | None] | None = None,
                 variants: Sequence[dict] | None = None, **options) -> schemas.CompressResponse:
        """Compress reasoning for plain problem strings; options are CompressRequest fields
        or Sampling fields (max_tokens, temperature, top_p, top_k, seed, n)."""
        answers = answers or [None] * len(problems)
        sampling_keys = set(schemas.Sampling.model_fields)
        sampling = {k: options.pop(k) for k in list(options) if k in sampling_keys}
        request = schemas.CompressRequest(
            problems=[schemas.Problem(text=p, answer=a) for p, a in zip(problems, answers)],
            sampling=schemas.Sampling(**sampling),
            variants=[schemas.VariantSpec(**v) for v in variants] if variants
            else [schemas.VariantSpec()],
            **options)
        return self.compress_request(request)

    def completions(self, body: dict) -> dict:
        """POST /v1/completions with a raw OpenAI/vLLM-shaped body (the trainer's rollouts)."""
        return self._request("POST", "/v1/completions", json=body)

    def load_weights(self, path, checksum: bool = True) -> dict:
        """Reload a checkpoint folder into the running engine; returns version/checksum."""
        return self._request("POST", "/v1/weights/load",
                             json={"path": str(path), "checksum": checksum})

    def weight_version(self) -> str | None:
        data = self.models().get("data") or [{}]
        return data[0].get("weight_version")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> StepzipClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

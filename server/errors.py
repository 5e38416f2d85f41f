"""Error responses: every 4xx names the field and the reason."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None,
                 reason: str | None = None):
        super().__init__(error)
        self.status, self.error = status, error
        self.details = [{"field": field, "reason": reason or error}] if field else []


def invalid(field: str, reason: str) -> ApiError:
    return ApiError(422, f"invalid request: {field}: {reason}", field, reason)


def not_ready() -> ApiError:
    return ApiError(503, "engine is starting or unavailable; retry shortly")


async def api_error_handler(_request: Request, exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return JSONResponse({"error": exc.error, "details": exc.details}, status_code=exc.status,
                        headers=headers)


async def validation_error_handler(_request: Request, exc: RequestValidationError):
    details = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        details.append({"field": ".".join(loc) or "body", "reason": err.get("msg", "invalid")})
    summary = "; ".join(f"{d['field']}: {d['reason']}" for d in details)
    return JSONResponse({"error": f"invalid request: {summary}", "details": details},
                        status_code=422)

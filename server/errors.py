"""Errors: one type (`ApiError`), one place that renders it, two bodies by route.

- Routes `vllm serve` also has (`VLLM_PATHS`: completions, chat, models, tokenize, TRL's
  helpers) answer as vLLM does, so OpenAI/TRL clients raise the right exception with the
  message: `{"error": {"message", "type", "param", "code"}}`, 400 for any bad request
  (request validation included), 404 for an unknown model, 503 while not ready or after
  the engine died.
- stepzip's own routes (`/v1/compress`, `/v1/weights/load`, ...) keep the richer body
  `{"error": "<message>", "details": [{"field", "reason"}]}`, 422 for validation.

Code raises `ApiError(status, message, field, reason)` or `invalid(field, reason)` and
never picks a body itself.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param

VLLM_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
    "/version", "/ping", "/load", "/get_world_size", "/server_info",
    "/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
    "/finish_weight_update", "/reset_prefix_cache",
})

# vLLM's `type` for the statuses its OpenAI routes answer (create_error_response).
_VLLM_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
               501: "NotImplementedError", 503: "ServiceUnavailableError"}
# Statuses outside the HTTP standard (HTTPStatus raises on them): nginx's 499, which
# records a request whose client went away before the answer.
_NONSTANDARD_PHRASES = {499: "Client Closed Request"}
_MAX_REPORTED = 10  # validation errors listed in one message (vLLM's bound too)


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None,
                 reason: str | None = None, *, kind: str | None = None):
        super().__init__(error)
        self.status, self.error, self.field, self.kind = status, error, field, kind
        self.details = [{"field": field, "reason": reason or error}] if field else []

    @classmethod
    def from_vllm(cls, response) -> ApiError:
        """An `ErrorResponse` returned by one of vLLM's serving objects."""
        info = response.error
        return cls(info.code, info.message, info.param, kind=info.type)


def invalid(field: str, reason: str) -> ApiError:
    return ApiError(422, f"invalid request: {field}: {reason}", field, reason)


def not_ready() -> ApiError:
    return ApiError(503, "engine is starting or unavailable; retry shortly")


def is_vllm_route(request: Request) -> bool:
    return request.url.path in VLLM_PATHS


def error_response(request: Request, exc: ApiError) -> JSONResponse:
    """The one place an error becomes a response."""
    status = exc.status
    if is_vllm_route(request):
        status = 400 if status == 422 else status  # vLLM answers every bad request 400
        body = {"error": {"message": exc.error,
                          "type": exc.kind or _VLLM_TYPES.get(status) or _phrase(status),
                          "param": exc.field, "code": status}}
    else:
        body = {"error": exc.error, "details": exc.details}
    headers = {"Retry-After": "5"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    return _NONSTANDARD_PHRASES.get(status) or HTTPStatus(status).phrase


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc)


async def validation_error_handler(request: Request, exc: RequestValidationError):
    """Pydantic validation of a body: the first failing field, every reason (bounded)."""
    details = []
    for err in exc.errors()[:_MAX_REPORTED]:
        # vLLM's cleaning drops pydantic's wrapper/union markers (`function-wrap[...]`)
        field = clean_loc_for_param(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            field = "body"
        details.append({"field": field.removeprefix("body.") or "body",
                        "reason": err.get("msg", "invalid")})
    summary = "; ".join(f"{d['field']}: {d['reason']}" for d in details) or "invalid body"
    first = details[0] if details else {"field": "body", "reason": "invalid"}
    error = ApiError(422, f"invalid request: {summary}", first["field"], first["reason"],
                     kind="Bad Request")  # vLLM's type for request validation errors
    error.details = details
    return error_response(request, error)


def documented(*statuses: int) -> dict:
    """OpenAPI `responses=` for a route: the error body it answers with per status."""
    return {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
            for status in statuses}


def documented_vllm(*statuses: int) -> dict:
    return {status: {"model": VllmErrorBody, "description": HTTPStatus(status).phrase}
            for status in statuses}


class ErrorDetail(BaseModel):
    field: str
    reason: str


class ErrorBody(BaseModel):
    """stepzip routes: 422 for validation, naming each field."""

    error: str
    details: list[ErrorDetail]


class VllmErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class VllmErrorBody(BaseModel):
    """Routes shared with `vllm serve`: vLLM's error body and status codes."""

    error: VllmErrorInfo

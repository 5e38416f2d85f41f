"""POST /v1/compress: problems in, reasoning with step entropies and compressed variants out."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import documented
from server.routes.deps import ready_engine, unless_disconnected
from stepzip.schemas import compress as schemas

router = APIRouter(tags=["compress"])


@router.post("/v1/compress", response_model=schemas.CompressResponse,
             responses=documented(401, 409, 413, 422, 429, 503))
async def compress(req: schemas.CompressRequest, request: Request) -> schemas.CompressResponse:
    ready_engine(request)
    return await unless_disconnected(request, request.app.state.compressor.compress(req))

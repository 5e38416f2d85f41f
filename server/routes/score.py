"""POST /v1/score: existing (problem, reasoning) pairs scored teacher-forced (one prefill
pass, or forced decoding where the runner cannot prefill-score); the response is
/v1/compress's."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute

from server.errors import documented, not_ready
from server.routes.deps import ready_engine, unless_disconnected
from stepzip.schemas.score import ScoreRequest, ScoreResponse


class NamedUtf8ErrorRoute(APIRoute):
    """A body that is not valid UTF-8 would otherwise fail JSON parsing as a whole (400,
    no field). Re-encoding it with the bad bytes as lone surrogates lets `json.loads`
    (which decodes with 'surrogatepass') parse it, and pydantic's string check then
    rejects exactly the field holding them with a 422."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            body = await request.body()
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                request._body = body.decode("utf-8", "surrogateescape").encode(
                    "utf-8", "surrogatepass")
            return await handler(request)

        return handle


router = APIRouter(tags=["score"], route_class=NamedUtf8ErrorRoute)


@router.post("/v1/score", response_model=ScoreResponse,
             responses=documented(401, 409, 413, 422, 429, 503))
async def score(req: ScoreRequest, request: Request) -> ScoreResponse:
    """Entropies, steps, variants and (optionally) answers for reasoning that already
    exists, as /v1/compress returns them for reasoning it generates. Each reasoning is
    teacher-forced after the prompt /v1/compress would render for its problem: one
    prefill pass over prompt + reasoning where the server can (`/health` says
    `"scoring": "prefill"`), else one forced decode step per token."""
    ready_engine(request)
    scorer = request.app.state.scorer
    if scorer is None:  # the engine is up but the services are still being built
        raise not_ready()
    return await unless_disconnected(request, scorer.score(req))

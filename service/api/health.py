"""Liveness and readiness probes (``/health/live``, ``/health/ready``)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.http.problems import problem_response

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="The process is up")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Models loaded, indexes replayed, database reachable",
    responses={503: {"description": "Not ready (problem+json with the failing checks)"}},
)
async def ready(request: Request) -> Any:
    state = getattr(request.app.state, "service", None)
    checks = dict(state.readiness) if state is not None else {"startup": False}
    if state is not None and state.ready:
        checks["database"] = await anyio.to_thread.run_sync(_database_reachable, state)
    ok = state is not None and state.ready and all(checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(sorted(k for k, v in checks.items() if not v)) or "startup"
    return problem_response(
        request,
        503,
        "Not ready",
        f"Failing checks: {failing}.",
        slug="not-ready",
        headers={"Retry-After": "5"},
        checks=checks,
    )


def _database_reachable(state: Any) -> bool:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False

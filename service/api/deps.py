"""Dependencies shared by the routers, as typed aliases (``State``, ``DbSession``) and ``authorize``.

``authorize`` is the seam where API keys and scopes plug in: every router already declares the
scope its endpoints need, and today every caller holds every scope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.api.problems import Problem
from service.state import ServiceState


class Scope(StrEnum):
    """What a caller may do: ``read`` search and view, ``write`` add items and run jobs, ``admin`` all."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None or not state.ready:
        raise Problem(
            503,
            "Service starting",
            "The service is not ready yet; retry in a moment.",
            slug="not-ready",
            headers={"Retry-After": "2"},
        )
    return state


State = Annotated[ServiceState, Depends(get_state)]


def get_session(state: State) -> Iterator[Session]:
    """A database session for one request (read-mostly; writers use explicit transactions)."""
    with state.sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def authorize(scope: Scope) -> Callable[[Request], None]:
    """A dependency asserting the caller holds ``scope`` (no authentication is configured yet)."""

    def check(request: Request) -> None:
        request.state.scope_required = scope

    return check

"""Dependencies shared by the routers, as typed aliases (``State``, ``DbSession``) and ``authorize``.

``authorize(scope)`` is how an endpoint states what it needs: the API-key guard
(:class:`service.http.auth.ApiAccessMiddleware`) has already authenticated the caller, and this checks
the caller's scope (admin implies write implies read), answering 403 when it falls short.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.http.auth import ANONYMOUS, Scope, challenge, request_principal
from service.http.problems import Problem
from service.state import ServiceState

__all__ = [
    "MAX_BIGINT_ID",
    "MAX_INT_ID",
    "DbSession",
    "EvaluationId",
    "GalleryId",
    "ItemId",
    "JobId",
    "Scope",
    "State",
    "authorize",
    "get_session",
    "get_state",
]

#: The largest keys the tables hold: INTEGER ids (galleries, jobs, evaluations), BIGINT ids (items).
MAX_INT_ID = 2**31 - 1
MAX_BIGINT_ID = 2**63 - 1
# Ids in paths. A larger number cannot name anything, so it is refused (422) before it reaches the
# database, where SQLite could not even bind it (an overflow, a 500).
GalleryId = Annotated[int, Path(ge=1, le=MAX_INT_ID, description="The gallery's id.")]
ItemId = Annotated[int, Path(ge=1, le=MAX_BIGINT_ID, description="The item's id.")]
JobId = Annotated[int, Path(ge=1, le=MAX_INT_ID, description="The job's id.")]
EvaluationId = Annotated[int, Path(ge=1, le=MAX_INT_ID, description="The evaluation's id.")]


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


# Documentation only (auto_error=False, and their values are not used): they put the two ways of
# sending a key into the OpenAPI schema, and the "Authorize" button into /docs. The guard checks keys.
_BEARER_DOC = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key as `Authorization: Bearer reid_...` (required when the service's auth is on).",
)
_API_KEY_DOC = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKey",
    description="The same API key in an `X-API-Key` header.",
)


def authorize(scope: Scope) -> Callable[..., None]:
    """A dependency asserting the caller holds ``scope``: 403 when its key's scope is lower."""

    def check(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER_DOC)] = None,
        _api_key: Annotated[str | None, Depends(_API_KEY_DOC)] = None,
    ) -> None:
        request.state.scope_required = scope
        principal = request_principal(request)
        if principal is None:
            # The guard only runs under /v1; anywhere else, fail closed unless keys are off.
            if request.app.state.settings.auth_enabled:
                raise Problem(
                    401,
                    "Authentication required",
                    "This endpoint requires an API key.",
                    slug="unauthorized",
                    headers={"WWW-Authenticate": challenge()},
                )
            principal = ANONYMOUS
        if not principal.scope.grants(scope):
            raise Problem(
                403,
                "Insufficient scope",
                f"This needs an API key with scope '{scope.value}' (or higher); "
                f"key {principal.key_id} ({principal.name}) has scope '{principal.scope.value}'.",
                slug="forbidden",
                headers={"WWW-Authenticate": challenge("insufficient_scope", scope)},
                required_scope=scope.value,
            )

    check.required_scope = scope  # type: ignore[attr-defined]  # for introspection of the routes
    return check

"""RFC 9457 problem details: every 4xx/5xx of the service is ``application/problem+json``.

Handlers for the framework's own errors (unknown route, wrong method, validation) and for
:class:`Problem` raised by the service's code; anything unexpected becomes a bare 500 whose body
never carries a stack trace (the trace goes to the log).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "/problems/"


class ProblemDetail(BaseModel):
    """The body of an error response (RFC 9457); extension members may follow."""

    type: str = Field("about:blank", examples=["/problems/not-found"])
    title: str = Field(..., examples=["Gallery not found"])
    status: int = Field(..., examples=[404])
    detail: str | None = Field(None, examples=["There is no gallery with id 42."])
    instance: str | None = Field(None, examples=["/v1/galleries/42"])

    model_config = {"extra": "allow"}


class Problem(Exception):
    """An error the client can act on, answered as problem+json.

    Args:
        status: HTTP status code.
        title: short, stable summary of the problem type.
        detail: what happened this time and what to do about it.
        slug: problem type name; the ``type`` member becomes ``/problems/<slug>``.
        headers: extra response headers (``Retry-After``, say).
        extensions: extra members of the body.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug
        self.headers = headers or {}
        self.extensions = extensions


def not_found(what: str, ident: object) -> Problem:
    return Problem(404, f"{what} not found", f"There is no {what.lower()} with id {ident}.", slug="not-found")


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str | None = None,
    *,
    slug: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    body.update(extensions)
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _handle_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(
        request, exc.status, exc.title, exc.detail, slug=exc.slug, headers=exc.headers, **exc.extensions
    )


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail in (None, "Not Found"):
        detail = f"No resource at {request.url.path}; the API lives under /v1 (see /docs)."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}."
    return problem_response(
        request, exc.status_code, _phrase(exc.status_code), detail, headers=getattr(exc, "headers", None)
    )


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


async def _handle_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"location": _location(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type")}
        for err in exc.errors()
    ]
    summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5])
    return problem_response(
        request,
        422,
        "Invalid request",
        summary or "The request is not valid.",
        slug="validation",
        errors=errors,
    )


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        500,
        "Internal Server Error",
        "The server failed to answer this request; the error is in its log.",
        slug="internal",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error through problem+json."""
    app.add_exception_handler(Problem, _handle_problem)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(Exception, _handle_unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers with these statuses."""
    return {
        status: {"model": ProblemDetail, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": _phrase(status)}
        for status in statuses
    }


PROBLEM_RESPONSES = problem_responses(400, 404, 409, 422, 503)

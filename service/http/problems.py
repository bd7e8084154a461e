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
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.http.request_context import REQUEST_ID_HEADER, current_request_id

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
    request_id: str | None = Field(
        None,
        description="The request's id (also its X-Request-ID header): quote it to find it in the log.",
        examples=["3f2c1a9e8b7d4c6f9a0b1c2d3e4f5a6b"],
    )

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
    request_id = current_request_id()
    if request_id is not None:
        body["request_id"] = request_id
        # Set here too, not only by the middleware: a 500 is sent by the error handler outside it.
        headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
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
        request,
        exc.status_code,
        _phrase(exc.status_code),
        detail,
        slug=getattr(exc, "slug", None),  # set by the service's own HTTP exceptions (body too large)
        headers=getattr(exc, "headers", None),
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


async def _handle_data_error(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the client sent (PostgreSQL text cannot hold NUL; a string too
    # long for its column; a number out of range): the request's fault, and nothing is stored.
    reason = getattr(exc, "orig", exc)
    logger.warning("database refused a value on %s %s: %s", request.method, request.url.path, reason)
    return problem_response(
        request,
        422,
        "Invalid value",
        "A value in the request cannot be stored or compared by the database "
        "(a NUL character, a text too long, a number out of range); nothing was changed.",
        slug="validation",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error through problem+json."""
    app.add_exception_handler(Problem, _handle_problem)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(DataError, _handle_data_error)
    app.add_exception_handler(Exception, _handle_unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers with these statuses."""
    return {
        status: {"model": ProblemDetail, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": _phrase(status)}
        for status in statuses
    }


def describe_problem_bodies(schema: dict[str, Any]) -> None:
    """Put the :class:`ProblemDetail` schema of error answers under ``application/problem+json``.

    FastAPI files the model of an extra response under the route's own media type (JSON); error
    bodies are sent as problem+json, so that is where clients and schema checkers must find it.
    """
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                content = response.get("content") if isinstance(response, dict) else None
                is_error = status.isdigit() and int(status) >= 400
                if not is_error or not content or PROBLEM_MEDIA_TYPE not in content:
                    continue
                moved = content.pop("application/json", {}).get("schema")
                if moved and not content[PROBLEM_MEDIA_TYPE].get("schema"):
                    content[PROBLEM_MEDIA_TYPE] = {"schema": moved}


#: What any /v1 operation may answer: 401/403/429 come from the API-key guard and the rate limit.
PROBLEM_RESPONSES = problem_responses(400, 401, 403, 404, 409, 422, 429, 503)

"""Limits on what a client controls: body size, media types, and how much work one job may ask for.

The body limit is enforced while the body streams in: a declared ``Content-Length`` over the limit
is refused before a byte is read, and a body without one (chunked) is cut off as soon as it grows
past the limit, so the service never buffers or spools more than the limit. The other request
limits (images per request, pixels, ``k``, the embedding queue, rate limits) live where the thing
they bound is handled; they are all settings (``service.settings``).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import HTTPException, Request
from fastapi.params import Form
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from service.http.problems import PROBLEM_MEDIA_TYPE, Problem, problem_response

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
JSON = "application/json"


class BodyTooLargeError(HTTPException):
    """The request body grew past its limit (raised from ``receive`` while it streams).

    An HTTP exception on purpose: FastAPI re-raises those from its body parsing untouched (any
    other error becomes a generic 400), so the client gets the 413 and its explanation.
    """

    slug = "body-too-large"

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


def body_too_large_detail(limit: int) -> str:
    return (
        f"The request body is larger than the {limit} bytes this service accepts "
        "(REID_MAX_BODY_BYTES); send fewer or smaller images per request."
    )


def json_body_too_large_detail(limit: int) -> str:
    return (
        f"The JSON body is larger than the {limit} bytes this service accepts for JSON "
        "(REID_MAX_JSON_BODY_BYTES); no operation needs more: shorten the lists in it."
    )


def media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value, lower case, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    """``application/json`` or a structured ``application/...+json`` type."""
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


def _is_json(scope: AsgiScope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return is_json(media_type(value.decode("latin-1")))
    return False


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than ``max_body_bytes`` with 413, counting while they stream.

    JSON bodies have their own, smaller limit ``max_json_body_bytes``: they are parsed whole on the
    event loop (FastAPI's body parsing), so their size is what bounds that pause; no JSON operation
    takes more than a few KB, while uploads need megabytes.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_body_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_body_bytes = max_body_bytes if max_json_body_bytes is None else max_json_body_bytes

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _is_json(scope) and self.max_json_body_bytes < self.max_body_bytes:
            limit, detail = self.max_json_body_bytes, json_body_too_large_detail(self.max_json_body_bytes)
        else:
            limit, detail = self.max_body_bytes, body_too_large_detail(self.max_body_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, detail)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            # Read outside FastAPI's body parsing (a middleware, a raw endpoint): answer here.
            if started:
                raise
            await self._refuse(scope, receive, send, detail)

    async def _refuse(self, scope: AsgiScope, receive: Receive, send: Send, detail: str) -> None:
        response = problem_response(
            Request(scope),
            413,
            "Request body too large",
            detail,
            slug=BodyTooLargeError.slug,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: AsgiScope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in request.headers


def accepted_media_types(route: APIRoute) -> tuple[str, ...] | None:
    """The media types an operation's body may have, or None when it takes no body."""
    field = route.body_field
    if field is None:
        return None
    # A form (File is a kind of Form) may come URL-encoded: it then simply has no files, which the
    # endpoint answers with a precise 422 ("send one or more images"), better than a 415.
    if isinstance(field.field_info, Form):
        return (MULTIPART, URLENCODED)
    return (JSON,)


def require_declared_media_type(request: Request) -> None:
    """App-wide dependency: a body whose ``Content-Type`` the operation does not take answers 415.

    Without it a JSON body sent to an upload endpoint (or a form to a JSON one) would surface as a
    confusing 422 about missing fields.
    """
    route = request.scope.get("route")  # the matched operation (set by FastAPI's routing)
    if not isinstance(route, APIRoute) or not _has_body(request):
        return
    accepted = accepted_media_types(route)
    if accepted is None:
        return
    media = media_type(request.headers.get("content-type", ""))
    if media in accepted or (JSON in accepted and is_json(media)):
        return
    raise Problem(
        415,
        "Unsupported media type",
        f"{request.method} {request.url.path} takes {' or '.join(accepted)}, "
        f"not {media or 'a body without Content-Type'}.",
        slug="unsupported-media-type",
        headers={"Accept-Post": ", ".join(accepted)} if request.method == "POST" else None,
    )


def document_request_limits(schema: dict[str, Any]) -> None:
    """Add the 413 (body too large) and 415 (media type) answers to every operation with a body.

    Both come from app-wide guards, not from the routers, so they are added to the OpenAPI schema
    here, in one place, for exactly the operations that can give them.
    """
    problem = {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            responses = operation.setdefault("responses", {})
            for status in (413, 415):
                responses.setdefault(
                    str(status),
                    {"description": HTTPStatus(status).phrase, "content": {PROBLEM_MEDIA_TYPE: problem}},
                )


# --------------------------------------------------------------------------------------- job sizes


def check_job_images(count: int | None, limit: int, what: str, setting: str) -> None:
    """422 when a job would process more than ``limit`` images."""
    if count is not None and count > limit:
        raise Problem(
            422,
            "Job too large",
            f"The {what} has {count} images, more than the {limit} one job may process ({setting}); "
            "split the dataset into several folders or ask the operator to raise the limit.",
            slug="job-too-large",
            images=count,
            limit=limit,
        )

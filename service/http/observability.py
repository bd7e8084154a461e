"""Request ids, access log and HTTP metrics for every request, and the ``/metrics`` endpoint.

:func:`install_observability` adds one pure ASGI middleware (not ``BaseHTTPMiddleware``, which runs
the endpoint in another task and breaks streaming responses and background tasks) that, for each
HTTP request:

* takes the request id from ``X-Request-ID`` when it is acceptable, or makes one, makes it current
  for the request's log records and problem bodies, and returns it in the ``X-Request-ID`` header;
* writes one access-log line (method, path, route template, status, duration, request id);
* counts the request and its latency by route *template* (``/v1/galleries/{gallery_id}``, never the
  raw path, which would make one time series per gallery or per scanner probe).

With ``metrics_enabled`` it also serves ``GET /metrics`` (Prometheus text format; with API keys on,
the guard asks for a key of any scope, since the metrics name galleries, their sizes, jobs and model
versions: give the scraper a read key) and binds the metrics to the service state
once the lifespan has built it. Call it last in ``create_app`` so its middleware is the outermost of
the user middlewares and sees every answer, including those of middlewares added before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.prometheus import UNMATCHED_ROUTE, ServiceMetrics
from service.http.request_context import (
    REQUEST_ID_HEADER,
    accept_request_id,
    new_request_id,
    reset_request_id,
    set_request_id,
)
from service.settings import Settings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("service.access")

_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")

#: Routes polled by machines (probes, scrapers): their access lines are DEBUG, not INFO, so they do
#: not drown the requests people make.
QUIET_ROUTES = frozenset({"/health/live", "/health/ready", "/metrics"})

#: Status recorded for a request whose handling was cancelled (the client went away, or shutdown),
#: after nginx's "client closed request".
CLIENT_CLOSED_STATUS = 499


class RouteTemplates:
    """The path templates of an application, to name requests answered before routing.

    A middleware further in (API keys, body size) may refuse a request before the router has
    matched it, so the scope names no route; matching the path against the application's templates
    still counts a refused ``/v1/galleries/7`` under ``/v1/galleries/{gallery_id}``. Built at first
    use, from the OpenAPI paths and the routes that carry their own pattern (mounts, hidden routes).
    """

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    def match(self, path: str) -> str | None:
        """The template whose pattern matches ``path`` (literal segments win), or ``None``."""
        if self._patterns is None:
            self._patterns = self._build()
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return None

    def _build(self) -> list[tuple[re.Pattern[str], str]]:
        patterns: dict[str, re.Pattern[str]] = {}
        for route in self._app.routes:
            regex, path_format = getattr(route, "path_regex", None), getattr(route, "path_format", None)
            if isinstance(regex, re.Pattern) and isinstance(path_format, str):
                patterns[path_format] = regex
        try:
            paths = self._app.openapi().get("paths", {})
        except Exception:  # a broken schema must not break request accounting
            logger.warning(
                "could not read the OpenAPI paths; refused requests count as unmatched", exc_info=True
            )
            paths = {}
        for template in paths:
            patterns.setdefault(template, compile_path(template)[0])
        # Fewer parameters first: /v1/jobs/stats must not be counted as /v1/jobs/{job_id}.
        return sorted(((p, t) for t, p in patterns.items()), key=lambda pt: (pt[1].count("{"), pt[1]))


def route_template(scope: Scope, root_path: str, templates: RouteTemplates | None = None) -> str:
    """The route a handled request matched, as its template (``/v1/jobs/{job_id}``).

    Args:
        scope: the request's ASGI scope after the application handled it (routing writes the
            matched route into it).
        root_path: the scope's ``root_path`` before routing; a mount (static files) records no
            route but appends its prefix to ``root_path``.
        templates: the application's templates, for requests answered before routing.
    """
    path_format = getattr(scope.get("route"), "path_format", None)
    if isinstance(path_format, str):
        return path_format
    mounted = scope.get("root_path", "")
    if scope.get("endpoint") is not None and mounted != root_path and mounted.startswith(root_path):
        return mounted[len(root_path) :] + "/{path}"
    if templates is not None:
        return templates.match(scope["path"]) or UNMATCHED_ROUTE
    return UNMATCHED_ROUTE


def _request_header(scope: Scope, key: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == key:
            return value.decode("latin-1")
    return None


class ObservabilityMiddleware:
    """Request id, access log and HTTP metrics around every HTTP request (see the module docstring).

    Args:
        app: the ASGI application to wrap.
        metrics: where to count requests; ``None`` when metrics are disabled.
        access_log: write one log line per request.
        templates: the application's route templates, to name requests refused before routing.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics | None = None,
        access_log: bool = True,
        templates: RouteTemplates | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = accept_request_id(_request_header(scope, _HEADER_KEY)) or new_request_id()
        header = (_HEADER_KEY, request_id.encode("latin-1"))
        root_path = scope.get("root_path", "")
        status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name.lower() == _HEADER_KEY for name, _ in headers):
                    headers.append(header)
                message = {**message, "headers": headers}
            await send(message)

        token = set_request_id(request_id)
        if self.metrics is not None:
            self.metrics.http_in_flight.inc()
        failed = False
        try:
            await self.app(scope, receive, send_with_request_id)
        except asyncio.CancelledError:
            failed = True
            if not response_started:
                status = CLIENT_CLOSED_STATUS
            raise
        except BaseException:
            # The error handler further out (Starlette's ServerErrorMiddleware) answers 500 with a
            # problem body; it runs in this same task after this frame, so the request id stays
            # current for it (below) and the problem body carries it in its header and body.
            failed = True
            if not response_started:
                status = 500
            raise
        finally:
            seconds = time.perf_counter() - start
            route = route_template(scope, root_path, self.templates)
            if self.metrics is not None:
                self.metrics.http_in_flight.dec()
                self.metrics.observe_request(scope["method"], route, status, seconds)
            if self.access_log:
                self._log(scope, route, status, seconds)
            # Left set after a failure on purpose (see above); each request runs in a task of its
            # own, whose context ends with it, so the id cannot leak into another request.
            if not failed:
                reset_request_id(token)

    @staticmethod
    def _log(scope: Scope, route: str, status: int, seconds: float) -> None:
        if status >= 500:
            level = logging.WARNING
        elif route in QUIET_ROUTES:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not access_logger.isEnabledFor(level):
            return
        client = scope.get("client")
        duration_ms = round(seconds * 1000.0, 2)
        access_logger.log(
            level,
            "%s %s %d %.1f ms",
            scope["method"],
            scope["path"],
            status,
            duration_ms,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
                "client": f"{client[0]}:{client[1]}" if client else None,
            },
        )


def _metrics_router(metrics: ServiceMetrics) -> APIRouter:
    @contextlib.asynccontextmanager
    async def bind_to_service(app: FastAPI) -> AsyncIterator[None]:
        # Nested inside the application's own lifespan (FastAPI merges router lifespans that way),
        # so the service state exists here and is still whole when this exits.
        state: Any = getattr(app.state, "service", None)
        if state is not None:
            metrics.bind(state)
        try:
            yield
        finally:
            metrics.unbind()

    router = APIRouter(lifespan=bind_to_service)

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        # Off the event loop: collecting reads the database (jobs by status) and every index.
        body = await anyio.to_thread.run_sync(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router


def install_observability(app: FastAPI, settings: Settings) -> ServiceMetrics | None:
    """Add the request-id/access-log/metrics middleware and, when enabled, ``/metrics``.

    Returns:
        The application's metrics (also ``app.state.metrics``), or ``None`` when
        ``settings.metrics_enabled`` is off.
    """
    metrics = ServiceMetrics(max_batch_size=settings.max_batch_size) if settings.metrics_enabled else None
    app.state.metrics = metrics
    if metrics is not None:
        app.include_router(_metrics_router(metrics))
    app.add_middleware(
        ObservabilityMiddleware,
        metrics=metrics,
        access_log=settings.access_log,
        templates=RouteTemplates(app),
    )
    return metrics

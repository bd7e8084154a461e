"""The FastAPI application: ``create_app(settings)`` and the lifespan that brings the service up.

Start-up, in order: open the database (and upgrade its schema when ``auto_migrate``), load every
configured model and record its version, load or rebuild every gallery's index (snapshot + log
replay), start the micro-batchers, the job workers (resuming interrupted jobs) and the periodic
snapshots; only then does ``/health/ready`` answer 200. Shutdown stops the workers at a batch
boundary, drains the batchers and writes a final snapshot of every changed index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select

from index import faiss_gpu
from service import image_release
from service.api import (
    evaluation_views,
    evaluations,
    galleries,
    health,
    idempotency,
    items,
    jobs,
    models,
    search,
)
from service.db import migrate
from service.db.session import create_db_engine, make_session_factory, transaction
from service.db.tables import ModelRow
from service.embedder import MicroBatcher, ModelRegistry, ModelRuntime, default_device
from service.gallery_index import IndexManager
from service.http.auth import ApiAccessMiddleware
from service.http.limits import BodySizeLimitMiddleware, document_request_limits, require_declared_media_type
from service.http.observability import install_observability
from service.http.problems import describe_problem_bodies, install_problem_handlers
from service.http.rate_limit import RateLimiter
from service.imaging.pools import ImageDecoder
from service.imaging.store import ImageStore
from service.item_writer import ItemWriter
from service.jobs.evaluate import run_evaluate
from service.jobs.ingest import run_ingest
from service.jobs.reembed import run_reembed
from service.jobs.runner import JobRunner
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)

API_DESCRIPTION = """Person and vehicle re-identification retrieval.

Create a gallery bound to a served model, fill it by uploading images or with an ingestion job over
a server-side dataset folder, then search it with query images. Evaluations score a model on a
labelled dataset with the Market-1501 or VehicleID protocol. Errors are RFC 9457 problem+json.
"""


#: The web page (index.html, app.js, style.css), served at ``/`` and ``/static``.
STATIC_DIR = Path(__file__).parent / "static"
#: Headers of the web page's files. The page has no inline script or style and no third-party code,
#: so it needs nothing but its own origin; ``blob:`` images are the query preview and the thumbnails
#: fetched with an API key, ``data:`` the empty favicon.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PageFiles(StaticFiles):
    """The web page's static files, sent with :data:`PAGE_HEADERS`."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


def index_page() -> FileResponse:
    """``GET /``: the web page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class SchemaOutdatedError(RuntimeError):
    """The database schema is older than this code and automatic migration is off."""


def _load_models(settings: Settings, sessions: Any) -> ModelRegistry:
    from training.export import load_model

    registry = ModelRegistry()
    device = settings.device or default_device()
    for spec in settings.models:
        on_cuda = torch.device(device).type == "cuda"  # half precision and graphs are GPU features
        loaded = load_model(
            spec.path,
            device=device,
            half_precision=settings.half_precision and on_cuda,
            cuda_graphs=settings.cuda_graphs and on_cuda,
            compile=settings.compile,
            runtime=settings.runtime,
            onnx_provider=settings.onnx_provider,
        )
        with transaction(sessions) as session:
            row = session.scalar(
                select(ModelRow).where(ModelRow.name == spec.name, ModelRow.version == loaded.version)
            )
            if row is None:
                row = ModelRow(
                    name=spec.name,
                    version=loaded.version,
                    kind=loaded.kind,
                    dim=loaded.dim,
                    path=str(spec.path),
                    meta=loaded.meta,
                )
                session.add(row)
                session.flush()
            else:
                row.path = str(spec.path)
            row_id = row.id
        batcher = MicroBatcher(
            loaded,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
        )
        registry.add(ModelRuntime(spec.name, loaded.version, row_id, loaded, batcher, str(spec.path)))
        logger.info(
            "model %s@%s (%s, dim %d) on %s (%s, %s runtime)",
            spec.name,
            loaded.version,
            loaded.kind,
            loaded.dim,
            loaded.device,
            str(loaded.dtype).removeprefix("torch."),
            loaded.runtime,
        )
    return registry


def exact_search_device(settings: Settings) -> str | None:
    """Where ``index_backend=auto`` puts flat galleries: the models' GPU when FAISS cannot use it.

    Without a faiss-gpu wheel FAISS searches on the CPU: 59 ms for one query of 1M x 768 on 16 cores
    against ~0.9 ms for the torch index's fp16 product on an H200 (bench/README.md).
    """
    if settings.index_backend != "auto":
        return None
    device = torch.device(settings.device or default_device())
    if device.type != "cuda" or faiss_gpu.gpu_count() > 0:
        return None
    return str(device)


def build_state(settings: Settings) -> ServiceState:
    """Everything blocking of the start-up (database, migrations, models, indexes)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.resolved_database_url)
    if settings.auto_migrate:
        migrate.upgrade(engine)
    else:
        current, head = migrate.current_revision(engine), migrate.head_revision()
        if current != head:
            raise SchemaOutdatedError(
                f"the database schema is at revision {current}, this code needs {head}: run `reid db upgrade`"
            )
    sessions = make_session_factory(engine)
    models_registry = _load_models(settings, sessions)
    backend_options: dict[str, Any] = {}
    if settings.index_backend == "milvus":
        backend_options["uri"] = settings.resolved_milvus_uri
    indexes = IndexManager(
        sessions,
        settings.data_dir / "snapshots",
        backend=settings.index_backend,
        backend_options=backend_options,
        snapshots_kept=settings.snapshots_kept,
        exact_device=exact_search_device(settings),
    )
    indexes.open_all()
    return ServiceState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        models=models_registry,
        indexes=indexes,
        # Its worker processes (decode_processes) start in the background; threads decode meanwhile.
        decoder=ImageDecoder(
            settings.decode_threads,
            max_pixels=settings.max_image_pixels,
            processes=settings.decode_processes,
        ),
        images=ImageStore(settings.data_dir, thumbnail_size=settings.thumbnail_size),
        writer=ItemWriter(sessions, indexes),
    )


async def _snapshot_loop(state: ServiceState) -> None:
    while True:
        await asyncio.sleep(state.settings.snapshot_interval_s)
        try:
            await anyio.to_thread.run_sync(state.indexes.snapshot_all)
        except Exception:
            logger.exception("periodic snapshot failed")


#: How often expired Idempotency-Key answers and stored images no item uses are deleted.
HOUSEKEEPING_INTERVAL_S = 3600.0


def _purge_idempotency_keys(state: ServiceState) -> None:
    with transaction(state.sessions) as session:
        purged = idempotency.purge_expired(session, state.settings.idempotency_ttl_s)
    if purged:
        logger.info("purged %d expired Idempotency-Key answers", purged)


def _sweep_images(state: ServiceState) -> None:
    image_release.sweep_orphans(state.sessions, state.images)


async def _housekeeping_loop(state: ServiceState) -> None:
    # A timer rather than work per request: requests stay free of bulk deletes and of walking the
    # image store, and a lookup ignores expired answers anyway, so rows that outlive their TTL by an
    # hour change nothing. The first round runs at once with the image sweep only (walking the store
    # may take a while: in the background; the keys were purged before the service became ready).
    chores = [("removing stored images no item uses", _sweep_images)]
    while True:
        for what, chore in chores:
            try:
                await anyio.to_thread.run_sync(chore, state)
            except Exception:
                logger.exception("%s failed", what)
        await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
        chores = [*chores[:1], ("purging expired Idempotency-Key answers", _purge_idempotency_keys)]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    state = await anyio.to_thread.run_sync(build_state, settings)
    for runtime in state.models:
        runtime.batcher.start()
    runner = JobRunner(
        state,
        {"ingest": run_ingest, "evaluate": run_evaluate, "reembed": run_reembed},
        workers=settings.job_workers,
    )
    state.jobs = runner
    runner.start()
    await anyio.to_thread.run_sync(_purge_idempotency_keys, state)  # what expired while it was down
    snapshots = asyncio.create_task(_snapshot_loop(state), name="index-snapshots")
    chores = asyncio.create_task(_housekeeping_loop(state), name="housekeeping")
    state.readiness = {"models": True, "indexes": True, "jobs": True}
    state.ready = True
    app.state.service = state
    logger.info("service ready: %d model(s), %d galleries", len(state.models), len(state.indexes.states()))
    try:
        yield
    finally:
        state.ready = False
        for task in (snapshots, chores):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await anyio.to_thread.run_sync(runner.stop)
        for runtime in state.models:
            await runtime.batcher.stop()
        await anyio.to_thread.run_sync(state.indexes.snapshot_all)
        state.indexes.close()
        await anyio.to_thread.run_sync(state.decoder.close)  # waits for the worker processes to exit
        state.engine.dispose()
        logger.info("service stopped")


def _install_guards(app: FastAPI, settings: Settings) -> None:
    """API keys and rate limits (innermost), the body-size limit, then CORS (outermost of the three).

    CORS answers browsers' preflight requests, which carry no key, before the key check; the body
    limit refuses an oversized upload before anything else looks at the request.
    """
    limiter = (
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s > 0
        else None
    )
    app.add_middleware(
        ApiAccessMiddleware,
        enabled=settings.auth_enabled,
        limiter=limiter,
        cache_ttl_s=settings.auth_cache_s,
    )
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_json_body_bytes=settings.max_json_body_bytes,
    )
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate_openapi()  # cached by FastAPI; the two edits below are idempotent
        document_request_limits(schema)
        describe_problem_bodies(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "X-Request-ID"],
            max_age=600,
        )
    logger.info(
        "API keys %s; rate limit %s; request bodies up to %d bytes; CORS %s",
        "required" if settings.auth_enabled else "not required",
        f"{settings.rate_limit_per_s:g}/s, burst {settings.rate_limit_burst}" if limiter else "off",
        settings.max_body_bytes,
        ", ".join(settings.cors_origins) if settings.cors_origins else "off",
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application for ``settings`` (default: from the environment and ``$REID_CONFIG``)."""
    if settings is None:
        from service.settings import load_settings

        settings = load_settings()
    docs = settings.docs_enabled
    app = FastAPI(
        title="reid retrieval service",
        version="1",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        dependencies=[Depends(require_declared_media_type)],
    )
    app.state.settings = settings
    install_problem_handlers(app)
    for module in (health, models, galleries, items, jobs, search, evaluations, evaluation_views):
        app.include_router(module.router)
    app.add_api_route("/", index_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
    _install_guards(app, settings)
    install_observability(app, settings)  # last: its middleware must be the outermost
    return app

"""`reid serve` and `reid db upgrade|downgrade|current`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


def _settings(config: Path | None, **overrides: Any) -> Any:
    from service.settings import SettingsError, load_settings

    try:
        return load_settings(config, **overrides)
    except (SettingsError, ValueError) as exc:
        # Plain lines, not Click's usage box: the box wraps "REID_..." messages mid-word and the
        # usage it prints does not help with an environment variable.
        for line in str(exc).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None


def serve(
    host: str | None = typer.Option(None, help="Address to bind (default: 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default: 8000)."),
    model: list[str] | None = typer.Option(
        None, "--model", help="NAME=MODEL_DIR of an exported model; repeat for several models/versions."
    ),
    database_url: str | None = typer.Option(None, help="SQLAlchemy URL (default: SQLite in the data dir)."),
    data_dir: Path | None = typer.Option(None, help="Uploads, thumbnails, snapshots (default: ./reid-data)."),
    dataset_root: list[Path] | None = typer.Option(
        None, "--dataset-root", help="Server-side folder that jobs may read; repeat for several."
    ),
    index_backend: str | None = typer.Option(
        None, help="auto, faiss, milvus or torch (default: auto: torch for flat galleries on a GPU without "
        "faiss-gpu, else faiss)."
    ),
    device: str | None = typer.Option(None, help="Torch device for the models (default: cuda if available)."),
    runtime: str | None = typer.Option(
        None,
        help="torch, onnx (ONNX Runtime on each model's model.onnx) or auto (ONNX Runtime for CNNs on a "
        "CPU when the model has model.onnx) (default: auto).",
    ),
    onnx_provider: str | None = typer.Option(
        None, help="ONNX Runtime provider: auto, cpu, cuda or tensorrt (default: auto: from --device)."
    ),
    config: Path | None = typer.Option(None, help="Settings file (YAML, or .env) (default: $REID_CONFIG)."),
    auth: str | None = typer.Option(
        None, help="API keys: on, off or auto (on unless --host is loopback) (default: auto)."
    ),
    log_level: str = typer.Option("info", help="Log level of the service and uvicorn."),
    log_format: str | None = typer.Option(
        None, help="json (one object per line) or text (default: json); also REID_LOG_FORMAT."
    ),
) -> None:
    """Run the retrieval service (one process: models and indexes live in it).

    Run one `reid serve` process per GPU, each with its own --device (and its own database and data
    directory): the models and the vector indexes are held in the process's memory, so several
    uvicorn workers would each load every model and index again, and their in-memory indexes would
    not see each other's writes. Every option can also be set as REID_<OPTION> in the environment
    (REID_MODELS, REID_DATASET_ROOTS, REID_DATABASE_URL ...) or in the settings file.
    """
    settings = _settings(
        config,
        host=host,
        port=port,
        models=model or None,
        database_url=database_url,
        data_dir=data_dir,
        dataset_roots=dataset_root or None,
        index_backend=index_backend,
        device=device,
        runtime=runtime,
        onnx_provider=onnx_provider,
        log_format=log_format,
        auth=auth,
    )
    _preflight(settings)
    from service.http.log_format import configure_logging

    # Before the imports below: some of them (alembic) already log.
    configure_logging(settings.log_format, log_level)
    import uvicorn

    from service.app import create_app

    # log_config=None: uvicorn's lines go through the handler above; access_log=False: the service
    # writes its own access lines, with the request id and the route template.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=log_level,
        log_config=None,
        access_log=False,
    )


def _preflight(settings: Any) -> None:
    """Refuse foreseeable mistakes with one line each, before uvicorn starts (and prints tracebacks)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not settings.models:
        typer.echo(
            "warning: no model configured (--model NAME=MODEL_DIR); searches will be refused", err=True
        )
    from service.settings import is_loopback_host

    if settings.auth_enabled:
        typer.echo(
            f"API keys required under /v1 (auth={settings.auth}, host {settings.host}); "
            "create one with `reid keys create --scope admin --name NAME`",
            err=True,
        )
    elif not is_loopback_host(settings.host):
        typer.echo(
            f"warning: serving {settings.host} without API keys (auth=off): anyone who can reach it "
            "can add and delete data",
            err=True,
        )
    from training.onnx_runtime import ONNX_NAME

    for spec in settings.models:
        if not (spec.path / "model.json").is_file():
            raise typer.BadParameter(
                f"model {spec.name}: {spec.path} is not an exported model directory (no model.json); "
                "export one with `reid export`",
                param_hint="--model",
            )
        if settings.runtime == "onnx" and not (spec.path / ONNX_NAME).is_file():
            raise typer.BadParameter(
                f"model {spec.name}: {spec.path} has no model.onnx, which --runtime onnx runs; add it with "
                f"`reid export-onnx {spec.path}`, or serve with --runtime torch or auto",
                param_hint="--runtime",
            )
    for root in settings.dataset_roots:
        if not root.is_dir():
            typer.echo(f"warning: dataset root {root} is not a folder; jobs cannot read it", err=True)
    try:
        backend = make_url(settings.resolved_database_url).get_backend_name()
    except ArgumentError as exc:
        raise typer.BadParameter(f"not a database URL: {exc}", param_hint="--database-url") from exc
    if backend not in ("sqlite", "postgresql"):
        raise typer.BadParameter(
            f"database backend {backend!r} is not supported: use sqlite:///PATH or postgresql+psycopg://...",
            param_hint="--database-url",
        )


def _engine(database_url: str | None, config: Path | None) -> Any:
    from service.db.session import create_db_engine

    settings = _settings(config, database_url=database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_db_engine(settings.resolved_database_url)


DatabaseOption = typer.Option(None, "--database-url", help="SQLAlchemy URL (default: from the settings).")
ConfigOption = typer.Option(None, "--config", help="Settings file (default: $REID_CONFIG).")


@db_app.command("upgrade")
def db_upgrade(
    revision: str = typer.Argument("head", help="Target revision."),
    database_url: str | None = DatabaseOption,
    config: Path | None = ConfigOption,
) -> None:
    """Upgrade the database schema (default: to the newest revision)."""
    from service.db import migrate

    engine = _engine(database_url, config)
    try:
        migrate.upgrade(engine, revision)
        typer.echo(f"database at revision {migrate.current_revision(engine)}")
    finally:
        engine.dispose()


@db_app.command("downgrade")
def db_downgrade(
    revision: str = typer.Argument(..., help="Target revision ('-1' one step, 'base' drops every table)."),
    database_url: str | None = DatabaseOption,
    config: Path | None = ConfigOption,
) -> None:
    """Downgrade the database schema."""
    from service.db import migrate

    engine = _engine(database_url, config)
    try:
        migrate.downgrade(engine, revision)
        typer.echo(f"database at revision {migrate.current_revision(engine) or 'base (empty)'}")
    finally:
        engine.dispose()


@db_app.command("current")
def db_current(database_url: str | None = DatabaseOption, config: Path | None = ConfigOption) -> None:
    """Print the database's schema revision and the newest one this code knows."""
    from service.db import migrate

    engine = _engine(database_url, config)
    try:
        typer.echo(
            f"current: {migrate.current_revision(engine) or 'base (empty)'}; head: {migrate.head_revision()}"
        )
    finally:
        engine.dispose()


keys_app = typer.Typer(
    help="API keys (scopes: read < write < admin). Keys are needed when the service binds a "
    "non-loopback address, or with REID_AUTH=on.",
    no_args_is_help=True,
)


def _key_store(database_url: str | None, config: Path | None) -> tuple[Any, Any]:
    """The key store on the same database as `reid serve`, its schema brought to head first."""
    from service.db import migrate
    from service.db.session import make_session_factory
    from service.http.auth import ApiKeyStore

    settings = _settings(config, database_url=database_url)
    engine = _engine(database_url, config)
    if settings.auto_migrate:
        migrate.upgrade(engine)
    elif migrate.current_revision(engine) != migrate.head_revision():
        engine.dispose()
        raise typer.BadParameter(
            "the database schema is not up to date (REID_AUTO_MIGRATE is off): run `reid db upgrade`",
            param_hint="--database-url",
        )
    return ApiKeyStore(make_session_factory(engine)), engine


@keys_app.command("create")
def keys_create(
    scope: str = typer.Option(
        ..., "--scope", help="read (search, view), write (+ add items, run jobs) or admin (everything)."
    ),
    name: str = typer.Option(..., "--name", help="Who or what uses the key (shown by `reid keys list`)."),
    database_url: str | None = DatabaseOption,
    config: Path | None = ConfigOption,
) -> None:
    """Create a key and print it once: only its hash is stored, it cannot be shown again."""
    from service.http.auth import ApiKeyError

    store, engine = _key_store(database_url, config)
    try:
        new = store.create(name, scope)
    except ApiKeyError as exc:
        raise typer.BadParameter(str(exc)) from exc
    finally:
        engine.dispose()
    typer.echo(new.token)
    typer.echo(
        f"key {new.key_id} ({new.name}, scope {new.scope.value}) created: store it now, it is not shown "
        "again. Send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
        err=True,
    )


@keys_app.command("list")
def keys_list(
    all_keys: bool = typer.Option(True, "--all/--active", help="Include revoked keys."),
    database_url: str | None = DatabaseOption,
    config: Path | None = ConfigOption,
) -> None:
    """List keys: id, name, scope, created, last used, revoked (never the keys themselves)."""
    store, engine = _key_store(database_url, config)
    try:
        keys = store.list(include_revoked=all_keys)
    finally:
        engine.dispose()
    if not keys:
        typer.echo("no API keys: create one with `reid keys create --scope admin --name NAME`")
        return

    def when(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"

    rows = [("ID", "NAME", "SCOPE", "CREATED (UTC)", "LAST USED", "REVOKED")]
    rows += [
        (k.key_id, k.name, k.scope.value, when(k.created_at), when(k.last_used_at), when(k.revoked_at))
        for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The key's id (first column of `reid keys list`)."),
    database_url: str | None = DatabaseOption,
    config: Path | None = ConfigOption,
) -> None:
    """Revoke a key; a running service stops accepting it within REID_AUTH_CACHE_S seconds."""
    from service.http.auth import ApiKeyError

    store, engine = _key_store(database_url, config)
    try:
        info = store.revoke(key_id)
    except ApiKeyError as exc:
        raise typer.BadParameter(str(exc), param_hint="KEY_ID") from exc
    finally:
        engine.dispose()
    typer.echo(f"key {info.key_id} ({info.name}) revoked")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(db_app, name="db")
    app.add_typer(keys_app, name="keys")

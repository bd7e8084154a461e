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
        raise typer.BadParameter(str(exc)) from exc


def serve(
    host: str | None = typer.Option(None, help="Address to bind [default: 127.0.0.1]."),
    port: int | None = typer.Option(None, help="Port [default: 8000]."),
    model: list[str] | None = typer.Option(
        None, "--model", help="NAME=MODEL_DIR of an exported model; repeat for several models/versions."
    ),
    database_url: str | None = typer.Option(None, help="SQLAlchemy URL [default: SQLite in the data dir]."),
    data_dir: Path | None = typer.Option(None, help="Uploads, thumbnails, snapshots [default: ./reid-data]."),
    dataset_root: list[Path] | None = typer.Option(
        None, "--dataset-root", help="Server-side folder that jobs may read; repeat for several."
    ),
    index_backend: str | None = typer.Option(None, help="faiss or milvus [default: faiss]."),
    device: str | None = typer.Option(None, help="Torch device for the models [default: cuda if available]."),
    config: Path | None = typer.Option(None, help="Settings file (YAML, or .env) [default: $REID_CONFIG]."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the retrieval service (one process: models and indexes live in it).

    Run one `reid serve` process per GPU, each with its own --device (and its own database and data
    directory): the models and the vector indexes are held in the process's memory, so several
    uvicorn workers would each load every model and index again, and their in-memory indexes would
    not see each other's writes. Every option can also be set as REID_<OPTION> in the environment
    (REID_MODELS, REID_DATASET_ROOTS, REID_DATABASE_URL ...) or in the settings file.
    """
    import uvicorn

    from service.app import create_app

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
    )
    _preflight(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1, log_level=log_level)


def _preflight(settings: Any) -> None:
    """Refuse foreseeable mistakes with one line each, before uvicorn starts (and prints tracebacks)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not settings.models:
        typer.echo(
            "warning: no model configured (--model NAME=MODEL_DIR); searches will be refused", err=True
        )
    for spec in settings.models:
        if not (spec.path / "model.json").is_file():
            raise typer.BadParameter(
                f"model {spec.name}: {spec.path} is not an exported model directory (no model.json); "
                "export one with `reid export`",
                param_hint="--model",
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


DatabaseOption = typer.Option(None, "--database-url", help="SQLAlchemy URL [default: from the settings].")
ConfigOption = typer.Option(None, "--config", help="Settings file [default: $REID_CONFIG].")


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


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(db_app, name="db")

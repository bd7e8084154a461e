"""Run the Alembic migrations programmatically (``reid db ...`` and start-up auto-upgrade).

The script location is resolved from the installed ``migrations`` package, so no alembic.ini and
no particular working directory are needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations

logger = logging.getLogger(__name__)
# Alembic announces each of its plugins at INFO on every start-up; the migrations themselves still log.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration that migrates the database behind ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # Handing over the engine's URL object (not a string in the ini) keeps passwords with '%' intact.
    config.attributes["url"] = engine.url
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (default: the newest)."""
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str = "-1") -> None:
    """Downgrade the schema to ``revision`` (``-1``: one step; ``base``: drop everything)."""
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision the installed migrations know."""
    engine_free_config = Config()
    engine_free_config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    head = ScriptDirectory.from_config(engine_free_config).get_current_head()
    if head is None:
        raise RuntimeError("the migrations package has no revisions: the installation is incomplete")
    return head

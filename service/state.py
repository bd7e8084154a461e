"""What one service process holds while it runs: settings, database, models, indexes, workers.

Built by the application's lifespan (``service.app``) and handed to endpoints through the
dependencies in ``service.api.deps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.embedder import ModelRegistry
from service.gallery_index import IndexManager
from service.imaging.pools import ImageDecoder
from service.imaging.store import ImageStore
from service.item_writer import ItemWriter
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs.runner import JobRunner


@dataclass
class ServiceState:
    """The live parts of the service; ``ready`` turns true once everything below is usable."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    models: ModelRegistry
    indexes: IndexManager
    decoder: ImageDecoder
    images: ImageStore
    writer: ItemWriter
    jobs: JobRunner | None = None
    ready: bool = False
    readiness: dict[str, bool] = field(default_factory=dict)

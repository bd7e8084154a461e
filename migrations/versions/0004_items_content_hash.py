"""An index on ``items.content_hash`` alone: releasing a deleted upload's bytes asks whether any
item of any gallery still uses that content (the (gallery_id, content_hash) index cannot answer it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_items_content_hash", "items", ["content_hash"])


def downgrade() -> None:
    op.drop_index("ix_items_content_hash", table_name="items")

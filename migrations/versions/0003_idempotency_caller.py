"""Idempotency keys belong to a caller (API key or anonymous) and expire: ``caller``, index on ``created_at``.

The unique constraint becomes (key, scope, caller), so the same ``Idempotency-Key`` sent with two
API keys names two requests. Rows stored before this revision had no caller: they become
``anonymous`` (the only caller there was when authentication was off; with it on, a retry after
the upgrade is answered as a new request at worst once, and such rows expire anyway).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite rebuilds the table (it cannot drop a constraint in place); PostgreSQL alters it.
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(
            sa.Column("caller", sa.String(length=64), server_default="anonymous", nullable=False)
        )
        batch.drop_constraint("uq_idempotency_keys_key_scope", type_="unique")
        batch.create_unique_constraint("uq_idempotency_keys_key_scope_caller", ["key", "scope", "caller"])
        batch.create_index("ix_idempotency_keys_created_at", ["created_at"])


def downgrade() -> None:
    # The old constraint allows one row per (key, scope): keep the oldest answer of each, as the old
    # code would have replayed it, and drop the other callers' (they can only be answered anew).
    op.execute(
        "DELETE FROM idempotency_keys WHERE id NOT IN "
        "(SELECT keep FROM (SELECT MIN(id) AS keep FROM idempotency_keys GROUP BY key, scope) AS oldest)"
    )
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_index("ix_idempotency_keys_created_at")
        batch.drop_constraint("uq_idempotency_keys_key_scope_caller", type_="unique")
        batch.create_unique_constraint("uq_idempotency_keys_key_scope", ["key", "scope"])
        batch.drop_column("caller")

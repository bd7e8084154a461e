"""Alembic environment and versions: the only way the database schema is made."""

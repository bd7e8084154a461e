"""Database: the typed ORM model and engine/session handling."""

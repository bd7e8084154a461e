"""Background jobs persisted in the database: ingestion, re-embedding (model upgrade), evaluation."""

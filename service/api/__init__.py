"""HTTP API: one router per resource, versioned under ``/v1`` (health checks at ``/health``)."""

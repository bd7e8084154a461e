"""HTTP plumbing: problem+json, API keys, rate and size limits, request ids, JSON logs, Prometheus."""

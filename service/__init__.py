"""The FastAPI retrieval service."""

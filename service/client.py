"""A small synchronous client for the service's REST API (used by `reid demo` and benchmarks).

It speaks only the public HTTP contract, so it exercises the service exactly as any user would.
Problem+json errors are raised as :class:`ServiceError` with the service's own title and detail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx


class ServiceError(RuntimeError):
    """The service answered with an error (its problem+json title and detail are in the message)."""


class ReidClient:
    """Calls the `/v1` API of one service.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout: seconds per request.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ReidClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
                message = f"{problem.get('title', response.reason_phrase)}: {problem.get('detail', '')}"
            except ValueError:
                message = response.text[:300]
            raise ServiceError(f"{method} {path} -> {response.status_code} {message}")
        return response

    def is_ready(self) -> bool:
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float, *, alive: Callable[[], bool] = lambda: True) -> None:
        """Poll /health/ready until it answers 200; ``alive`` lets the caller stop early on a crash."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            if not alive():
                raise ServiceError("the service process exited during start-up")
            time.sleep(0.5)
        raise ServiceError(f"the service was not ready after {timeout_s:.0f} s")

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()

    def galleries(self) -> list[dict[str, Any]]:
        body = self._request("GET", "/v1/galleries", params={"limit": 100}).json()
        return body["items"] if isinstance(body, dict) else body

    def gallery(self, gallery_id: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/galleries/{gallery_id}").json()

    def get_or_create_gallery(self, name: str, model: str) -> dict[str, Any]:
        """The gallery called ``name`` (re-runs reuse it), created for ``model`` if missing."""
        for gallery in self.galleries():
            if gallery["name"] == name:
                return gallery
        return self._request("POST", "/v1/galleries", json={"name": name, "model": model}).json()

    def start_ingest(self, gallery_id: int, source: dict[str, Any]) -> dict[str, Any]:
        return self._request(
            "POST", f"/v1/galleries/{gallery_id}/ingest-jobs", json={"source": source}
        ).json()

    def job(self, job_id: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def start_evaluation(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/evaluations", json=request).json()

    def evaluation(self, evaluation_id: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/evaluations/{evaluation_id}").json()

    def search(self, gallery_id: int, images: Sequence[Path], *, k: int = 10) -> list[list[dict[str, Any]]]:
        """Results (best first) for each query image file."""
        files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        body = self._request("POST", f"/v1/galleries/{gallery_id}/search", files=files, data={"k": str(k)})
        return [query["results"] for query in body.json()["queries"]]

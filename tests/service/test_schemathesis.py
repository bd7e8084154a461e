"""Contract fuzzing with schemathesis 4: every operation of the OpenAPI schema, against the real app.

For each operation, hypothesis draws requests that fit the schema (positive) and requests that
break it (negative), with random resource ids and with the ids of resources that exist (a seeded
gallery, item, job, evaluation), through the real ASGI application with its lifespan (a tiny
model, SQLite, API keys on, an admin key). Every response must not be a 5xx and must conform to
the schema: a documented status, a declared content type, a body matching its schema, declared
headers. Bounded (a few examples per operation) and deterministic (derandomized hypothesis).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.http.auth import ApiKeyStore, Scope
from service.settings import Settings
from tests.service.conftest import (
    DATABASES,
    POSTGRES_ENV,
    fresh_postgres_database,
    jpeg_bytes,
    make_settings,
    wait_for_job,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES_PER_OPERATION = 15


def _operations() -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
    """(METHOD, path) of every documented operation, deletions last (items before their gallery) so
    that they do not starve the others of the seeded resources; and those that take image uploads."""
    paths = create_app(Settings(docs_enabled=True)).openapi()["paths"]
    found = [(method.upper(), path) for path, ops in paths.items() for method in ops]
    uploads = {
        (method.upper(), path)
        for path, ops in paths.items()
        for method, op in ops.items()
        if "multipart/form-data" in op.get("requestBody", {}).get("content", {})
    }
    order = sorted(
        found, key=lambda op: (op[0] == "DELETE", -op[1].count("/") if op[0] == "DELETE" else 0, op)
    )
    return order, uploads


OPERATIONS, UPLOADS = _operations()


@pytest.fixture(scope="module", params=DATABASES)
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh SQLite file, or a fresh database on the test PostgreSQL server, for the module."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('schemathesis-db') / 'reid.sqlite3'}"
        return
    server = os.environ.get(POSTGRES_ENV)
    assert server is not None
    with fresh_postgres_database(server) as url:
        yield url


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
    database: str,
    model_dirs: dict[str, Path],
    datasets_root: Path,
    market_root: Path,
) -> Iterator[tuple[Any, dict[str, int], dict[str, str]]]:
    """The loaded schema (its app running), ids of existing resources, and the admin key's header."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    app_settings = make_settings(
        tmp,
        database,
        model_dirs,
        datasets_root,
        auth="on",
        rate_limit_per_s=0,  # fuzzing sends requests as fast as it can; 429s would hide the operations
        max_k=20,
    )
    app = create_app(app_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    try:
        with schemathesis_asgi.get_client(app) as client:
            store = ApiKeyStore(app.state.service.sessions)
            headers = {"Authorization": f"Bearer {store.create('schemathesis', Scope.ADMIN).token}"}
            client.headers.update(headers)
            gallery = client.post("/v1/galleries", json={"name": "fuzz", "model": "person"}).json()
            files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in (1, 2, 3)]
            items = client.post(f"/v1/galleries/{gallery['id']}/items", files=files).json()["items"]
            source = {"layout": "market1501", "root": str(market_root), "split": "query"}
            job = client.post(f"/v1/galleries/{gallery['id']}/ingest-jobs", json={"source": source})
            dataset = {"layout": "market1501", "root": "market"}  # relative to the dataset root
            evaluation = client.post("/v1/evaluations", json={"model": "person", "dataset": dataset})
            for location in (job.headers["location"], evaluation.headers["location"]):
                assert wait_for_job(client, location)["status"] == "succeeded"
        ids = {
            "gallery_id": gallery["id"],
            "item_id": items[0]["id"],
            "job_id": job.json()["id"],
            "evaluation_id": evaluation.json()["id"],
            "name": "person",
        }
        yield schema, ids, headers
    finally:
        schemathesis_asgi.shutdown_lifespans()


def _strategy(operation: Any, ids: dict[str, Any], upload: bool) -> st.SearchStrategy[Any]:
    """Schema-valid and schema-breaking requests, the schema's own examples, and, where resources
    exist, the same aimed at them (with a real image where the operation takes uploads)."""
    names = {p.name for p in operation.path_parameters}
    known = {name: ids[name] for name in names if name in ids}
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
        *operation.get_strategies_from_examples(),
    ]
    if known:
        strategies += [
            operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known),
            operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=known),
        ]
    if upload:
        body = {"image": [jpeg_bytes(2)], "k": 2}
        strategies.append(
            operation.as_strategy(path_parameters=known, body=body, media_type="multipart/form-data")
        )
    return st.one_of(strategies)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_its_schema_and_never_fails(
    api: tuple[Any, dict[str, int], dict[str, str]], method: str, path: str
) -> None:
    schema, ids, headers = api
    operation = schema[path][method]

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategy(operation, ids, (method, path) in UPLOADS))
    def run(case: Any) -> None:
        response = case.call(headers=headers)
        case.validate_response(response, checks=CHECKS)

    run()

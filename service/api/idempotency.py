"""``Idempotency-Key`` support: a retried POST gets the first answer instead of a second job.

The key is stored in the same transaction as the resource it created, with a fingerprint of the
request; a retry with the same key and the same request replays the stored status, body and
``Location``, and the same key with a different request is refused (422).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import IdempotencyKey
from service.http.problems import Problem

MAX_KEY_LENGTH = 200


def fingerprint(payload: Any) -> str:
    """SHA-256 of the request's canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]
    location: str | None


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise Problem(
            400,
            "Invalid Idempotency-Key",
            f"The Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} characters.",
            slug="idempotency-key",
        )
    return key


def lookup(session: Session, key: str, scope: str, request_hash: str) -> StoredResponse | None:
    """The stored answer for (key, scope), or None; raises 422 if the key was used for another request."""
    row = session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.key == key, IdempotencyKey.scope == scope)
    )
    if row is None:
        return None
    if row.request_hash != request_hash:
        raise Problem(
            422,
            "Idempotency-Key reused",
            "This Idempotency-Key was already used with a different request; "
            "use a new key for a new request.",
            slug="idempotency-key-reused",
        )
    return StoredResponse(row.status_code, dict(row.response), row.location)


def remember(
    session: Session,
    key: str,
    scope: str,
    request_hash: str,
    status_code: int,
    body: dict[str, Any],
    location: str | None,
) -> None:
    """Store the answer in the caller's transaction (committed with the resource it describes)."""
    session.add(
        IdempotencyKey(
            key=key,
            scope=scope,
            request_hash=request_hash,
            status_code=status_code,
            response=body,
            location=location,
        )
    )

"""``Idempotency-Key`` support: a retried POST gets the first answer instead of a second job.

The key is stored in the same transaction as the resource it created, with a fingerprint of the
request; a retry with the same key and the same request replays the stored status, body and
``Location``, and the same key with a different request is refused (422). Because the answer is
committed with the resource, a retry after a failure that came later (the commit succeeded, the
response did not reach the client or was a 500) replays what was committed.

Keys belong to the caller (its API key; one anonymous caller when authentication is off) and
expire after the ``idempotency_ttl_s`` setting: an expired key is a new request. Expired rows are
purged at start-up and then hourly (:func:`purge_expired`, run by the app), and an expired row is
replaced when its key is used again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Header, Request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.db.tables import IdempotencyKey, utcnow
from service.http.auth import request_principal
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


@dataclass(frozen=True)
class Claim:
    """An ``Idempotency-Key`` as one caller sent it, and how long its answer is kept."""

    key: str
    caller: str
    ttl_s: float

    def cutoff(self) -> dt.datetime:
        """Answers stored before this time are expired."""
        return utcnow() - dt.timedelta(seconds=self.ttl_s)


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


def caller_of(request: Request) -> str:
    """Who owns the keys of this request: ``key:ID`` of its API key, or ``anonymous`` (auth off)."""
    principal = request_principal(request)
    return f"key:{principal.key_id}" if principal is not None and principal.key_id else "anonymous"


def claim(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="A retry with the same key (and the same API key) replays the first answer "
            "instead of doing the request again; kept for REID_IDEMPOTENCY_TTL_S (default 24 h).",
        ),
    ] = None,
) -> Claim | None:
    """The request's claim (a FastAPI dependency), or None when it sent no ``Idempotency-Key``."""
    key = check_key(idempotency_key)
    if key is None:
        return None
    return Claim(key, caller_of(request), request.app.state.settings.idempotency_ttl_s)


def _row(session: Session, claim: Claim, scope: str) -> IdempotencyKey | None:
    return session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.key == claim.key,
            IdempotencyKey.scope == scope,
            IdempotencyKey.caller == claim.caller,
        )
    )


def lookup(session: Session, claim: Claim, scope: str, request_hash: str) -> StoredResponse | None:
    """The stored, unexpired answer of this caller's key on this route, or None.

    Raises 422 if the caller used the key for another request.
    """
    row = _row(session, claim, scope)
    if row is None or row.created_at < claim.cutoff():
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
    claim: Claim,
    scope: str,
    request_hash: str,
    status_code: int,
    body: dict[str, Any],
    location: str | None,
) -> None:
    """Store the answer in the caller's transaction (committed with the resource it describes)."""
    expired = _row(session, claim, scope)
    if expired is not None and expired.created_at < claim.cutoff():
        # The key is being used anew: its old answer makes way (the unique constraint holds one).
        session.delete(expired)
        session.flush()
    session.add(
        IdempotencyKey(
            key=claim.key,
            scope=scope,
            caller=claim.caller,
            request_hash=request_hash,
            status_code=status_code,
            response=body,
            location=location,
        )
    )


def purge_expired(session: Session, ttl_s: float) -> int:
    """Delete every answer older than ``ttl_s`` seconds (in the caller's transaction); how many."""
    cutoff = utcnow() - dt.timedelta(seconds=ttl_s)
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)

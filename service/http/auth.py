"""API keys: generation, hashed storage, constant-time verification, scopes, and the request guard.

A key looks like ``reid_3f9a2c1d0b7e_<43 url-safe characters>``: the middle part is the key's
public id (stored in clear, shown by ``reid keys list``, used to find the row), the last part is
256 random bits from :mod:`secrets`. The database keeps only the SHA-256 of the whole key, so a
copy of the database does not let anyone call the service, and the key is shown once, at creation.

Why SHA-256 and not a slow password hash (bcrypt, scrypt, Argon2): a slow hash exists to make
guessing a *low-entropy* secret from its stolen hash expensive. A 256-bit random key cannot be
guessed whatever the hash costs (2^255 tries on average), so one SHA-256 is as safe, and it keeps
verification at microseconds, where a slow hash on every request would hand a denial of service
to anyone who can send requests.

Scopes are ordered: ``admin`` implies ``write`` implies ``read``. Authentication happens in
:class:`ApiAccessMiddleware`, before the request body is read, for every path under ``/v1``;
each endpoint then asks for its scope with ``service.api.deps.authorize``. Health probes, the web
page and the API documentation stay open.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from service.db.tables import ApiKey, utcnow
from service.http.problems import problem_response
from service.http.rate_limit import RateLimiter

logger = logging.getLogger(__name__)

KEY_PREFIX = "reid"
#: Paths that need a key when authentication is on (everything else: health, web page, docs).
PROTECTED_PREFIX = "/v1"
#: Where the guard leaves the caller's :class:`Principal` in the ASGI scope.
PRINCIPAL_SCOPE_KEY = "reid.principal"
#: The realm named in ``WWW-Authenticate`` challenges.
REALM = "reid"

_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")


class Scope(StrEnum):
    """What a caller may do: ``read`` search and view, ``write`` add items and run jobs, ``admin`` all."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def grants(self, required: Scope) -> bool:
        """Whether a key with this scope may do what ``required`` allows (admin > write > read)."""
        return self.rank >= required.rank


_RANKS = {Scope.READ: 0, Scope.WRITE: 1, Scope.ADMIN: 2}


class ApiKeyError(ValueError):
    """A key management request that cannot be done (unknown key, bad scope or name)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key, or ``anonymous`` (every scope) when authentication is off."""

    key_id: str | None
    name: str
    scope: Scope

    @property
    def rate_key(self) -> str | None:
        """The rate-limit bucket of this caller; None means "by client address"."""
        return f"key:{self.key_id}" if self.key_id else None


ANONYMOUS = Principal(None, "anonymous", Scope.ADMIN)


@dataclass(frozen=True)
class NewKey:
    """A freshly created key: ``token`` is the only copy of the secret and is never stored."""

    key_id: str
    name: str
    scope: Scope
    token: str


@dataclass(frozen=True)
class KeyInfo:
    """What ``reid keys list`` shows about a key (never its secret)."""

    key_id: str
    name: str
    scope: Scope
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


# --------------------------------------------------------------------------------- keys themselves


def generate_key() -> tuple[str, str]:
    """A new ``(key_id, token)``: 48-bit public id, 256-bit secret, both from :mod:`secrets`."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)  # 32 bytes -> 43 characters, no padding
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def hash_key(token: str) -> str:
    """Hex SHA-256 of a whole key: what the database stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_key_id(token: str) -> str | None:
    """The public id of a well-formed key, or None if ``token`` is not shaped like a key."""
    match = _KEY_RE.match(token)
    return match.group(1) if match else None


def verify_key(token: str, stored_hash: str) -> bool:
    """Whether ``token`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_key(token), stored_hash)


def parse_scope(value: str) -> Scope:
    try:
        return Scope(value.strip().lower())
    except ValueError:
        raise ApiKeyError(
            f"scope {value!r} is not one of {', '.join(s.value for s in Scope)} "
            "(admin implies write implies read)"
        ) from None


# ------------------------------------------------------------------------------------ the key store


class ApiKeyStore:
    """Create, list, revoke and look up keys in the ``api_keys`` table.

    Args:
        sessions: the service's session factory.
        touch_interval_s: ``last_used_at`` is written at most this often per key, so that a busy
            key does not turn every request into a database write.
    """

    def __init__(self, sessions: sessionmaker[Session], *, touch_interval_s: float = 60.0) -> None:
        self.sessions = sessions
        self.touch_interval_s = touch_interval_s

    def create(self, name: str, scope: Scope | str) -> NewKey:
        scope = parse_scope(scope) if isinstance(scope, str) else scope
        name = name.strip()
        if not name or len(name) > 200:
            raise ApiKeyError("a key needs a name of 1 to 200 characters (who or what uses it)")
        key_id, token = generate_key()
        with self.sessions() as session, session.begin():
            session.add(ApiKey(key_id=key_id, name=name, scope=scope.value, secret_hash=hash_key(token)))
        logger.info("API key %s (%s, scope %s) created", key_id, name, scope.value)
        return NewKey(key_id, name, scope, token)

    def list(self, *, include_revoked: bool = True) -> list[KeyInfo]:
        stmt = select(ApiKey).order_by(ApiKey.id)
        if not include_revoked:
            stmt = stmt.where(ApiKey.revoked_at.is_(None))
        with self.sessions() as session:
            return [
                KeyInfo(
                    row.key_id, row.name, Scope(row.scope), row.created_at, row.last_used_at, row.revoked_at
                )
                for row in session.scalars(stmt)
            ]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key by its public id; revoking twice is allowed (the first time is kept)."""
        key_id = key_id.strip().removeprefix(f"{KEY_PREFIX}_").split("_")[0]
        with self.sessions() as session, session.begin():
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
            if row is None:
                raise ApiKeyError(f"no API key with id {key_id!r}: see `reid keys list`")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            info = KeyInfo(
                row.key_id, row.name, Scope(row.scope), row.created_at, row.last_used_at, row.revoked_at
            )
        logger.info("API key %s revoked", key_id)
        return info

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked key, or None (blocking: run it in a thread)."""
        key_id = parse_key_id(token)
        if key_id is None:
            return None
        with self.sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
            if row is None or row.revoked_at is not None or not verify_key(token, row.secret_hash):
                return None
            principal = Principal(row.key_id, row.name, Scope(row.scope))
            now = utcnow()
            if row.last_used_at is None or (now - row.last_used_at).total_seconds() >= self.touch_interval_s:
                row.last_used_at = now
                session.commit()
        return principal


class CachedAuthenticator:
    """Remembers successful authentications for ``ttl_s`` so a busy client does not query per request.

    A revoked key therefore keeps working for at most ``ttl_s`` seconds in a running service (the
    revocation is made by ``reid keys revoke``, another process). Failures are not cached: a wrong
    key costs one indexed lookup, and the caller's address is rate limited meanwhile.
    """

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        ttl_s: float,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    async def authenticate(self, token: str) -> Principal | None:
        # Keyed by the hash: the cache never holds a usable secret.
        digest = hash_key(token)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await anyio.to_thread.run_sync(self.store.authenticate, token)
        if principal is None:
            self._cache.pop(digest, None)
            return None
        if self.ttl_s > 0:
            self._cache[digest] = (now + self.ttl_s, principal)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return principal


def presented_key(headers: Any) -> str | None:
    """The key of a request: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    value = headers.get("authorization")
    if value:
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    value = headers.get("x-api-key")
    if value and value.strip():
        return value.strip()
    return None


def challenge(error: str | None = None, scope: Scope | None = None) -> str:
    """A ``WWW-Authenticate`` value (RFC 6750 Bearer challenge)."""
    parts = [f'Bearer realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if scope is not None:
        parts.append(f'scope="{scope.value}"')
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------- the guard


class ApiAccessMiddleware:
    """Authenticates and rate limits every request under ``/v1`` before its body is read.

    With authentication on, a missing or invalid key answers 401 (problem+json with a
    ``WWW-Authenticate`` challenge); a valid key becomes the request's :class:`Principal`, which
    ``authorize`` compares with the endpoint's scope. Every caller then draws from a token bucket:
    its key's bucket, or its client address's when authentication is off (failed authentications
    draw from the address's bucket too). An empty bucket answers 429 with ``Retry-After``.

    Args:
        app: the wrapped ASGI application.
        enabled: whether keys are required.
        limiter: the token buckets, or None for no rate limit.
        cache_ttl_s: how long a verified key is trusted without asking the database again.
    """

    def __init__(
        self, app: ASGIApp, *, enabled: bool, limiter: RateLimiter | None, cache_ttl_s: float = 5.0
    ) -> None:
        self.app = app
        self.enabled = enabled
        self.limiter = limiter
        self.cache_ttl_s = cache_ttl_s
        self._authenticator: CachedAuthenticator | None = None

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_protected(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        address = f"ip:{scope['client'][0]}" if scope.get("client") else "ip:unknown"
        principal = ANONYMOUS
        if self.enabled:
            authenticator = self._get_authenticator(scope)
            token = presented_key(request.headers)
            try:
                if authenticator is None:  # the lifespan has not opened the database yet
                    raise SQLAlchemyError("the service is starting")
                found = await authenticator.authenticate(token) if token is not None else None
            except SQLAlchemyError as exc:
                await self._unavailable(request, exc, scope, receive, send)
                return
            if found is None:
                if await self._limited(request, address, send, scope, receive):
                    return
                await self._unauthorized(request, token is not None, scope, receive, send)
                return
            principal = found
        if await self._limited(request, principal.rate_key or address, send, scope, receive):
            return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    def _get_authenticator(self, scope: AsgiScope) -> CachedAuthenticator | None:
        # The database is opened by the lifespan, after this middleware is built: found on first use,
        # and again if the application was started anew (a new session factory).
        state = getattr(getattr(scope.get("app"), "state", None), "service", None)
        if state is None:
            return None
        if self._authenticator is None or self._authenticator.store.sessions is not state.sessions:
            self._authenticator = CachedAuthenticator(ApiKeyStore(state.sessions), ttl_s=self.cache_ttl_s)
        return self._authenticator

    async def _limited(
        self, request: Request, bucket: str, send: Send, scope: AsgiScope, receive: Receive
    ) -> bool:
        if self.limiter is None:
            return False
        wait = self.limiter.acquire(bucket)
        if wait <= 0:
            return False
        retry_after = max(1, math.ceil(wait))
        who = "this API key" if bucket.startswith("key:") else "this client address"
        response = problem_response(
            request,
            429,
            "Too many requests",
            f"The rate limit of {who} is {self.limiter.rate:g} requests/s with bursts of "
            f"{self.limiter.burst}; retry after {retry_after} s.",
            slug="rate-limited",
            headers={"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)
        return True

    async def _unavailable(
        self, request: Request, exc: Exception, scope: AsgiScope, receive: Receive, send: Send
    ) -> None:
        logger.warning("API keys cannot be checked: %s", exc)
        response = problem_response(
            request,
            503,
            "Authentication unavailable",
            "API keys cannot be checked right now (the service is starting or its database is "
            "unreachable); retry in a moment.",
            slug="not-ready",
            headers={"Retry-After": "2"},
        )
        await response(scope, receive, send)

    async def _unauthorized(
        self, request: Request, presented: bool, scope: AsgiScope, receive: Receive, send: Send
    ) -> None:
        if presented:
            detail = "The API key is not valid (unknown, revoked or mistyped); ask an admin for a key."
            header = challenge("invalid_token")
        else:
            detail = (
                "This service requires an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
                "(keys are made with `reid keys create`)."
            )
            header = challenge()
        response = problem_response(
            request,
            401,
            "Authentication required",
            detail,
            slug="unauthorized",
            headers={"WWW-Authenticate": header},
        )
        await response(scope, receive, send)


#: Outside /v1 but guarded too: the metrics name galleries, their sizes, jobs and model versions.
PROTECTED_PATHS = frozenset({"/metrics"})


def _is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/") or path in PROTECTED_PATHS


def request_principal(request: Request) -> Principal | None:
    """The principal the guard attached to this request, if it ran."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else None

"""JWKS URLs (``JWT_PUBLIC_KEY_URL``): fetching their keys, caching them, fetching again.

The keys of every URL are fetched with aiohttp and kept for ``litellm_jwtauth.public_key_ttl``
seconds. A token whose ``kid`` is not known makes the verifier fetch again (key rotation), at
most once per ``refetch_interval`` seconds however many such tokens arrive, and concurrent
callers share one fetch. When the JWKS host is down, the keys fetched before keep being used
(stale, for as long as it stays down) rather than failing every request; a URL that has never
answered fails only the tokens it would have verified, and is retried at most once per
``refetch_interval``. When the TTL has passed, the cached keys keep answering while the
refresh runs in the background, so no request waits on the identity provider while keys
are known (a withdrawn key is accepted until that refresh lands, milliseconds later).

:class:`server.jwt_auth.JwtVerifier` owns one :class:`JwksCache` and decides which of its keys
may verify a token; a JWKS document is parsed by :mod:`server.jwt_keys`. This module imports
aiohttp (and, through :mod:`server.jwt_keys`, PyJWT and cryptography), so it is imported only
by :mod:`server.jwt_auth`, only when JWT authentication is configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiohttp

from server.clock import Clock
from server.jwt_keys import JwtKey, parse_jwks

if TYPE_CHECKING:
    from server.settings import JwtSettings

__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_REFETCH_INTERVAL",
    "JwksCache",
    "JwksSource",
]

log = logging.getLogger("budgetd.jwt")

# The bound on what an untrusted JWKS response may make us parse.
MAX_JWKS_BYTES: Final = 1024 * 1024
DEFAULT_REFETCH_INTERVAL: Final = 5.0
DEFAULT_FETCH_TIMEOUT: Final = 5.0


@dataclass(slots=True)
class JwksSource:
    """One JWKS URL's keys, and how fresh they are."""

    url: str
    keys: tuple[JwtKey, ...] = ()
    fetched_at: float | None = None  # None: never fetched successfully
    error: str | None = None  # why the last fetch failed (None: it did not)


class _FetchError(Exception):
    """A JWKS URL answered, but not with a JWKS."""


class JwksCache:
    """The keys of the JWKS URLs in ``settings.public_key_url``, one :class:`JwksSource` each.

    ``fetch``, ``refetch_interval`` and ``fetch_timeout`` are those of
    :class:`server.jwt_auth.JwtVerifier`, which owns the cache.
    """

    def __init__(
        self,
        settings: JwtSettings,
        *,
        clock: Clock,
        fetch: Callable[[str], Awaitable[object]] | None,
        refetch_interval: float,
        fetch_timeout: float,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._fetch = fetch
        self._refetch_interval = refetch_interval
        self._fetch_timeout = fetch_timeout
        urls = [url.strip() for url in (settings.public_key_url or "").split(",")]
        self.sources = tuple(JwksSource(url) for url in dict.fromkeys(url for url in urls if url))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._last_attempt: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the HTTP session for JWKS URLs (nothing is fetched until a token needs keys)."""
        if self._fetch is None and self.sources and self._session is None and not self._closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._fetch_timeout)
            )

    async def close(self) -> None:
        """Stop any fetch in flight and close the HTTP session."""
        self._closed = True
        task, self._refreshing = self._refreshing, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh(self) -> None:
        """Fetch every JWKS URL now (joining a fetch in flight); failures keep cached keys."""
        task = self._refreshing or self._start_refresh()
        # Shielded: a caller that gives up must not cancel the fetch the others wait for.
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this caller is being cancelled
            # The fetch was stopped by close(); its callers carry on with the keys they have.

    async def freshen(self) -> None:
        """Make sure there are JWKS keys to try, and refresh them when their TTL has passed."""
        now = self._clock.now()
        if not any(jwks.fetched_at is not None for jwks in self.sources):
            # Nothing cached: this token must wait for the first fetch (or share it).
            if self.may_fetch():
                await self.refresh()
            return
        ttl = self._settings.public_key_ttl
        stale = any(
            jwks.fetched_at is None or now - jwks.fetched_at >= ttl for jwks in self.sources
        )
        if stale and self._refreshing is None and self.may_fetch():
            # Cached keys keep answering; the refresh runs in the background.
            self._start_refresh()

    def may_fetch(self) -> bool:
        """Whether a fetch is in flight (join it) or the last one is long enough ago."""
        if self._closed:
            return False
        if self._refreshing is not None or self._last_attempt is None:
            return True
        return self._clock.now() - self._last_attempt >= self._refetch_interval

    def _start_refresh(self) -> asyncio.Task[None]:
        """Start fetching every JWKS URL; concurrent callers wait on this one task."""
        self._last_attempt = self._clock.now()
        task = asyncio.create_task(self._fetch_all(), name="budgetd-jwks-refresh")
        self._refreshing = task
        task.add_done_callback(self._refresh_done)
        return task

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None

    async def _fetch_all(self) -> None:
        await asyncio.gather(*(self._fetch_one(jwks) for jwks in self.sources))

    async def _fetch_one(self, jwks: JwksSource) -> None:
        try:
            document = await (self._fetch or self._http_get)(jwks.url)
            keys = parse_jwks(document, jwks.url)
        except asyncio.CancelledError:
            jwks.error = f"JWKS at {jwks.url} could not be fetched: the verifier is closing"
            raise
        # Whatever goes wrong (network, HTTP status, JSON, a custom fetch's own errors), the
        # previous keys stay: a brief outage of the identity provider must not lock everyone out.
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self._fetch_timeout:g} s"
            jwks.error = f"JWKS at {jwks.url} could not be fetched: {reason}"
            if jwks.fetched_at is not None:
                log.warning(
                    "%s; still using the %d keys fetched before", jwks.error, len(jwks.keys)
                )
            else:
                log.warning("%s", jwks.error)
            return
        jwks.keys, jwks.fetched_at, jwks.error = keys, self._clock.now(), None
        log.debug("JWKS at %s: %d keys", jwks.url, len(keys))

    async def _http_get(self, url: str) -> object:
        if self._closed:
            raise _FetchError("the verifier is closed")
        await self.start()
        assert self._session is not None
        async with self._session.get(url, headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise _FetchError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _FetchError(f"the response is larger than {MAX_JWKS_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchError("the response is not JSON") from None

"""How every process reaches the cluster's Redis: one URL, redis-py's asyncio client, backoff.

URLs: `redis://[:password@]host:port/db`, `rediss://...` (TLS) or `unix:///path/to.sock`.
A password the URL lacks comes from the environment (`PDSERVE_REDIS_PASSWORD`), so a
Kubernetes Secret can supply it without putting it on a command line.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

PASSWORD_ENV = "PDSERVE_REDIS_PASSWORD"
URL_ENV = "PDSERVE_REDIS_URL"
_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisSettings:
    url: str
    # Short timeouts: a Redis that stops answering must not stall a router's event loop; the
    # caller keeps serving on what it last read and retries with backoff.
    socket_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(
                f"Redis URL must start with redis://, rediss:// or unix://, got {redacted_url(self.url)!r}")

    @classmethod
    def from_url(cls, url: str) -> "RedisSettings":
        """The URL, with the environment's password filled in when the URL has none."""
        password = os.environ.get(PASSWORD_ENV)
        parts = urlsplit(url)
        if password and parts.scheme in ("redis", "rediss") and not parts.password:
            netloc = f"{parts.username or ''}:{quote(password, safe='')}@{parts.hostname}"
            if parts.port:
                netloc += f":{parts.port}"
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return cls(url)


def connect(settings: RedisSettings):
    """A redis.asyncio client (bytes in, bytes out). Connections are made on first use and
    remade after a failure, so a client outlives a Redis restart."""
    import redis.asyncio as aioredis

    return aioredis.from_url(
        settings.url, decode_responses=False, socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s, health_check_interval=10)


def redacted_url(url: str) -> str:
    """The URL with its password replaced by '***', for logs and errors."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Backoff:
    """Exponential backoff with jitter for reconnect loops: 0.1 s doubling up to `cap_s`."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 2.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self._next = first_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap_s)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first_s


def is_redis_error(err: BaseException) -> bool:
    """Errors that mean "Redis is unreachable or went away" (retry later), not a bug."""
    import redis.exceptions as rex

    return isinstance(err, (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError,
                            ConnectionError, TimeoutError, OSError))

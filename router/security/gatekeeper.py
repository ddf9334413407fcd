"""What both front doors ask before a request reaches the cluster, built once per router."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster_state.rate_limits import RateLimiter, key_id
from router.limits import RequestLimits, StreamCounter
from router.security.api_keys import ApiKeys, bearer_token
from router.security.config import SecurityConfig
from router.security.quota import Quota
from router.security.tls import ServerTls


@dataclass
class Gatekeeper:
    """API keys, rate limits, request limits and TLS of one router's front doors."""

    keys: ApiKeys = field(default_factory=ApiKeys)
    quota: Quota = field(default_factory=lambda: Quota(None, None))
    limits: RequestLimits = field(default_factory=RequestLimits)
    tls: ServerTls | None = None
    # Open Generate streams per gRPC connection; the HTTP front door keeps its own per address.
    streams: StreamCounter = field(init=False)

    def __post_init__(self) -> None:
        self.streams = StreamCounter(self.limits.max_streams_per_connection)

    @classmethod
    def build(cls, security: SecurityConfig, limits: RequestLimits, redis=None, cluster_keys=None) -> "Gatekeeper":
        """Read and check the TLS files (TlsError naming the file); rate limits need the cluster's
        Redis, where every router shares the buckets."""
        limiter = None
        if not security.rate_limit.unlimited:
            if redis is None:
                raise ValueError("rate limits need the cluster's Redis")
            limiter = RateLimiter(redis, cluster_keys, security.rate_limit)
        tls = security.tls.load() if security.tls is not None else None
        return cls(security.api_keys, Quota(security.rate_limit, limiter), limits, tls)

    def authenticate(self, authorization: str | None) -> None:
        """Unauthenticated unless the `Authorization` value carries an accepted key."""
        self.keys.verify(bearer_token(authorization))

    def client_id(self, authorization: str | None, address: str) -> str:
        """Whom a request's rate limits are charged to: its key where keys are required (it has
        been verified by then), else its client's address. A token nobody checks names no one:
        charged to it, every made-up token would get a bucket of its own."""
        return self._verified_key(authorization) or f"address:{client_host(address)}"

    def owner(self, authorization: str | None) -> str:
        """Who may resume a request's stream: a digest of its (verified) API key, kept in the
        request journal instead of the key; "" where keys are not required, since anyone may
        then send anything. An address would not do: a client resumes after a router died,
        often from another connection, through another proxy."""
        key = self._verified_key(authorization)
        return key_id(key) if key else ""

    def _verified_key(self, authorization: str | None) -> str | None:
        """The request's API key where keys are required (verified by then), else None."""
        return bearer_token(authorization) if self.keys.required else None


def client_host(address: str) -> str:
    """A client's host, the same for gRPC's peer ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")
    and aiohttp's remote ("1.2.3.4", "::1"): its connections share one set of buckets."""
    for scheme in ("ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme):]
            if address.startswith("["):  # [v6]:port
                return address[1:address.find("]")]
            return address.rsplit(":", 1)[0] if scheme == "ipv4:" else address
    return address

"""What both front doors ask before a request reaches the cluster, built once per router."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster_state.rate_limits import RateLimiter
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

    @staticmethod
    def client_id(authorization: str | None, address: str) -> str:
        """Whom a request's rate limits are charged to: its key, else its client's address."""
        return bearer_token(authorization) or f"address:{address}"

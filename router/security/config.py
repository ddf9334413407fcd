"""The front doors' security settings, as `pdserve serve` was given them."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster_state.rate_limits import RateLimit
from router.security.api_keys import ApiKeys
from router.security.tls import TlsFiles


@dataclass(frozen=True)
class SecurityConfig:
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    rate_limit: RateLimit = field(default_factory=RateLimit)  # per key (per client address without keys)
    tls: TlsFiles | None = None  # None: plaintext

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            if getattr(self.rate_limit, name) < 0:
                raise ValueError(f"rate limit {name} must be at least 0 (0: unlimited)")

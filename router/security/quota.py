"""Per-key requests and tokens per minute, at admission, over buckets shared through Redis.

What counts as tokens: a request takes its prompt tokens plus its max_tokens (after the server
fitted max_tokens to the context) when it is admitted, so concurrent requests cannot overdraw a
key; when it ends, the max_tokens it did not generate are given back. A request that left
max_tokens to the server would take the whole rest of the context, more than a small per-minute
limit holds; it runs to at most the limit less its prompt instead (fit_defaulted_max_tokens).
Without API keys the limits apply per client address. Redis away: requests pass (logged once per outage), because
no request depends on Redis while it runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from cluster_state.connection import is_redis_error
from cluster_state.rate_limits import RateLimit, RateLimiter
from router.intake import AdmittedRequest

logger = logging.getLogger(__name__)


class RateLimited(Exception):
    """Over a limit; retry_after_s is None when waiting cannot help (the request alone is more
    than a minute's tokens)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up, as HTTP's Retry-After and the gRPC metadata carry it."""
        if self.retry_after_s is None:
            return None
        return str(max(1, int(-(-self.retry_after_s // 1))))


@dataclass(frozen=True)
class Grant:
    client: str  # the API key (or client address) the request was charged to
    reserved_completion_tokens: int  # max_tokens, taken at admission


class Quota:
    def __init__(self, limit: RateLimit, limiter: RateLimiter | None) -> None:
        self.limit = limit
        self._limiter = limiter if limit is not None and not limit.unlimited else None
        self._redis_down = False

    @property
    def enabled(self) -> bool:
        return self._limiter is not None

    def fit_defaulted_max_tokens(self, admitted: AdmittedRequest) -> AdmittedRequest:
        """A request whose max_tokens the server chose, capped so that it fits a minute's tokens
        with its prompt (a prompt that alone is over the limit is left to take()'s refusal)."""
        tpm = self.limit.tokens_per_minute if self._limiter is not None else 0
        if not tpm or admitted.max_tokens_explicit:
            return admitted
        room = tpm - len(admitted.prompt_token_ids)
        if room < 1 or admitted.params.max_tokens <= room:
            return admitted
        return replace(admitted, params=replace(admitted.params, max_tokens=room))

    async def take(self, client: str, prompt_tokens: int, max_tokens: int) -> Grant | None:
        """Charge one request; RateLimited when the client is over a limit."""
        if self._limiter is None:
            return None
        cost = prompt_tokens + max_tokens
        tpm = self.limit.tokens_per_minute
        if tpm and cost > tpm:
            raise RateLimited(f"the request needs {cost} tokens (prompt {prompt_tokens} + max_tokens "
                              f"{max_tokens}), more than the per-key limit of {tpm} tokens per "
                              f"minute (--rate-limit-tpm)", None)
        try:
            decision = await self._limiter.take(client, cost, time.time())
        except Exception as err:
            if not is_redis_error(err):
                raise
            self._note_outage(err)
            return None
        self._redis_down = False
        if not decision.allowed:
            raise RateLimited(f"rate limit reached ({self._describe()}); retry after "
                              f"{decision.retry_after_s:.1f} s", decision.retry_after_s)
        return Grant(client, max_tokens)

    async def give_back(self, grant: Grant | None, completion_tokens: int) -> None:
        """What the request reserved and did not generate returns to its bucket."""
        if grant is None or self._limiter is None:
            return
        unused = grant.reserved_completion_tokens - completion_tokens
        try:
            await self._limiter.give_back(grant.client, unused, time.time())
        except Exception as err:
            if not is_redis_error(err):
                raise
            self._note_outage(err)

    def _describe(self) -> str:
        parts = []
        if self.limit.requests_per_minute:
            parts.append(f"{self.limit.requests_per_minute} requests per minute (--rate-limit-rpm)")
        if self.limit.tokens_per_minute:
            parts.append(f"{self.limit.tokens_per_minute} tokens per minute (--rate-limit-tpm)")
        return ", ".join(parts)

    def _note_outage(self, err: BaseException) -> None:
        if not self._redis_down:
            logger.warning("rate limits not enforced while Redis is unreachable: %s", err)
        self._redis_down = True

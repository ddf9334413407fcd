"""API keys, rate limits and streams per client on the HTTP front door (aiohttp).

Every route under /v1/ needs `Authorization: Bearer KEY` when keys are configured (401 with
OpenAI's error JSON otherwise); /health and /metrics stay open for probes and scrapers, as in
vLLM. A request over its key's rate limits gets 429 with a `Retry-After` header.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from router.http.errors import ApiError
from router.security.api_keys import ApiKeys, Unauthenticated, bearer_token
from router.security.quota import RateLimited

PROTECTED_PREFIX = "/v1/"


def api_key_middleware(keys: ApiKeys):
    @web.middleware
    async def require_api_key(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if keys.required and request.path.startswith(PROTECTED_PREFIX):
            try:
                keys.verify(bearer_token(request.headers.get("Authorization")))
            except Unauthenticated as exc:
                raise ApiError(401, str(exc).replace("`authorization: Bearer KEY`", "`Authorization: Bearer KEY`"),
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}) from exc
        return await handler(request)
    return require_api_key


def rate_limited_error(exc: RateLimited) -> ApiError:
    retry = exc.retry_after_header
    return ApiError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": retry} if retry else None)


def streams_exhausted_error(message: str) -> ApiError:
    return ApiError(429, message.replace("on this connection", "from this client address"),
                    code="too_many_streams")


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


async def charge(gate, request: web.Request, prompt_tokens: int, max_tokens: int):
    """The request's share of its key's (or address's) rate limits; 429 when over them."""
    if not gate.quota.enabled:
        return None
    client = gate.client_id(request.headers.get("Authorization"), client_address(request))
    try:
        return await gate.quota.take(client, prompt_tokens, max_tokens)
    except RateLimited as exc:
        raise rate_limited_error(exc) from exc

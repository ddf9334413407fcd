"""OpenAI's error JSON: {"error": {"message", "type", "param", "code"}} with a fitting status."""
from __future__ import annotations

import json

from aiohttp import web

# HTTP status -> OpenAI's error type for it.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "internal_server_error",
          503: "service_unavailable"}


class ApiError(Exception):
    """A request that ends in an error response; param names the offending field, if any."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=json.dumps(self.body()), content_type="application/json",
                            headers=self.headers)


def bad_request(param: str | None, message: str) -> ApiError:
    text = f"{param}: {message}" if param else message
    return ApiError(400, text, param, "invalid_value")

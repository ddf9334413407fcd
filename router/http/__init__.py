"""The router's OpenAI-compatible HTTP front door (step 1 and steps 6-7 of a request's life).

`POST /v1/completions` and `POST /v1/chat/completions` (streamed as server-sent events or not),
`GET /v1/models`, `GET /health` and `GET /metrics`, on aiohttp, served on the router's event loop
beside the gRPC server. Bodies are parsed here into the router's plain request types
(router.http.protocol); validation, tokenization, the backend and cancellation are the gRPC
door's own (router.intake, router.relay), so both doors behave alike.
"""
from router.http.server import DEFAULT_MAX_BODY_BYTES, HttpServer, running_http

__all__ = ["DEFAULT_MAX_BODY_BYTES", "HttpServer", "running_http"]

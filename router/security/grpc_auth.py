"""API keys on the gRPC front door: a server interceptor that refuses calls without a valid
`authorization: Bearer KEY` with UNAUTHENTICATED. The health service and reflection stay open,
so probes and grpcurl-style discovery need no key."""
from __future__ import annotations

from collections.abc import Iterable

import grpc

from router.security.api_keys import ApiKeys, Unauthenticated, bearer_token


def metadata_value(metadata: Iterable | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, open_services: Iterable[str]) -> None:
        self._keys = keys
        self._open = frozenset(open_services)

    async def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        if service in self._open or not self._keys.required:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        try:
            self._keys.verify(bearer_token(metadata_value(handler_call_details.invocation_metadata,
                                                          "authorization")))
        except Unauthenticated as exc:
            return None if handler is None else _refusing(handler, str(exc))
        return handler


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    codecs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)

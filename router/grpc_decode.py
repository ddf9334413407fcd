"""Requests that are not valid protobuf get INVALID_ARGUMENT naming the field, not UNKNOWN.

gRPC parses a request before any servicer code runs, and a parse failure (a string field that
is not UTF-8, a truncated or corrupt message) would end the call with UNKNOWN and the parser's
words. A server interceptor wraps each method's parser: a failure becomes INVALID_ARGUMENT, and
a walk over the raw wire format finds the field at fault (`chat.messages[0].content: not valid
UTF-8`).
"""
from __future__ import annotations

import inspect
import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError


class _Undecodable:
    def __init__(self, message: str) -> None:
        self.message = message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def bad_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The path of the first string field whose bytes are not UTF-8; None if there is none (or
    the wire format is corrupt before one is found)."""
    pos, seen = 0, {}
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                index = seen[number] = seen.get(number, -1) + 1
                path = prefix + field.name + (f"[{index}]" if _repeated(field) else "")
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = bad_utf8_field(chunk, field.message_type, path + ".")
                    if inner is not None:
                        return inner
            else:
                return None
    except ValueError:
        return None
    return None


def _repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)
    return is_repeated if isinstance(is_repeated, bool) else field.label == FieldDescriptor.LABEL_REPEATED


def describe_decode_error(data: bytes, descriptor: Descriptor, err: Exception) -> str:
    field = bad_utf8_field(data, descriptor)
    if field is not None:
        return f"{field}: not valid UTF-8"
    return f"request: not a valid {descriptor.name}: {err}"


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the parsers of the given services' methods (request message classes by method)."""

    def __init__(self, request_types: dict[str, type]) -> None:
        self._types = request_types  # "/package.Service/Method" -> message class

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        message_type = self._types.get(handler_call_details.method)
        if handler is None or message_type is None or handler.request_deserializer is None:
            return handler
        return _guarded(handler, message_type)


def request_types(service_descriptor, module) -> dict[str, type]:
    """Method path -> request class, for every method of a service."""
    return {f"/{service_descriptor.full_name}/{m.name}": getattr(module, m.input_type.name)
            for m in service_descriptor.methods}


def _guarded(handler: grpc.RpcMethodHandler, message_type: type) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def safe_parse(data: bytes):
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as err:
            return _Undecodable(describe_decode_error(data, message_type.DESCRIPTOR, err))

    kind, behavior = next((k, getattr(handler, k)) for k in ("unary_unary", "unary_stream") if getattr(handler, k))
    if inspect.isasyncgenfunction(behavior):
        async def guarded(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behavior(request, context):
                yield response
    else:
        async def guarded(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)
    make = grpc.unary_unary_rpc_method_handler if kind == "unary_unary" else grpc.unary_stream_rpc_method_handler
    return make(guarded, request_deserializer=safe_parse, response_serializer=handler.response_serializer)

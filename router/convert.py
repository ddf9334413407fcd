"""Conversion between pdserve.v1 protobuf messages and the router's plain types.

This is the only place in the router that reads or builds Generation messages; the servicer
works on what from_proto returns and hands StreamChunks to to_proto.
"""
from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from router.intake import GenerateInput, InvalidArgument, make_sampling_params
from router.relay import FinalStats
from router.streaming import StreamChunk

__all__ = ["FinalStats", "GenerateInput", "InvalidArgument", "finish_reason_name", "from_proto",
           "sampling_params_from_proto", "sampling_params_to_proto", "to_proto"]

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
# Proto fields whose unset state must reach SamplingParams as "use the default".
_OPTIONAL_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty", "logprobs")
# Proto fields where the proto3 zero value equals SamplingParams' default.
_PLAIN_PARAMS = (
    "top_k", "min_p", "ignore_eos", "presence_penalty", "frequency_penalty",
    "include_stop_str_in_output",
)


def from_proto(request: pb.GenerateRequest) -> GenerateInput:
    """Check and convert a request; raises InvalidArgument naming the offending field."""
    params = sampling_params_from_proto(request.sampling_params)
    common = dict(
        request_id=request.request_id,
        model=request.model,
        params=params,
        max_tokens_explicit=request.sampling_params.HasField("max_tokens"),
        priority=request.priority,
    )
    kind = request.WhichOneof("input")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return GenerateInput(prompt=request.prompt, **common)
    if kind == "chat":
        return GenerateInput(messages=_messages_from_proto(request.chat), **common)
    if kind == "token_ids":
        if not request.token_ids.ids:
            raise InvalidArgument("token_ids.ids", "must not be empty")
        return GenerateInput(token_ids=tuple(request.token_ids.ids), **common)
    raise InvalidArgument("input", "one of prompt, chat or token_ids is required")


def _messages_from_proto(chat: pb.ChatMessages) -> tuple[tuple[str, str], ...]:
    if not chat.messages:
        raise InvalidArgument("chat.messages", "must not be empty")
    for i, message in enumerate(chat.messages):
        if not message.role:
            raise InvalidArgument(f"chat.messages[{i}].role", "must not be empty")
    return tuple((m.role, m.content) for m in chat.messages)


def sampling_params_from_proto(proto: pb.SamplingParams) -> SamplingParams:
    """Build SamplingParams, reusing its own validation; errors name the offending field."""
    kwargs: dict[str, Any] = {name: getattr(proto, name) for name in _PLAIN_PARAMS}
    kwargs.update({n: getattr(proto, n) for n in _OPTIONAL_PARAMS if proto.HasField(n)})
    kwargs["stop"] = tuple(proto.stop)
    kwargs["stop_token_ids"] = tuple(proto.stop_token_ids)
    return make_sampling_params(kwargs, lambda name: f"sampling_params.{name}")


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """Every field set explicitly, so the server uses exactly these values."""
    proto = pb.SamplingParams(
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        **{name: getattr(params, name) for name in _PLAIN_PARAMS},
    )
    for name in _OPTIONAL_PARAMS:
        value = getattr(params, name)
        if value is not None:
            setattr(proto, name, value)
    return proto


def to_proto(request_id: str, chunk: StreamChunk, final: FinalStats | None = None) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id, token_ids=chunk.token_ids, text=chunk.text
    )
    if chunk.logprobs is not None:
        response.logprobs.extend(
            _logprobs_to_proto(token_id, top) for token_id, top in zip(chunk.token_ids, chunk.logprobs)
        )
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[chunk.finish_reason]
    if chunk.stop_string:
        response.stop_string = chunk.stop_string
    if final is not None:
        response.usage.CopyFrom(pb.Usage(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            cached_prompt_tokens=final.cached_prompt_tokens,
        ))
        response.timing.CopyFrom(pb.Timing(
            time_to_first_token_ms=final.time_to_first_token_s * 1e3,
            total_time_ms=final.total_time_s * 1e3,
        ))
    return response


def _logprobs_to_proto(token_id: int, top: dict[int, float]) -> pb.TokenLogprobs:
    entry = pb.TokenLogprobs(token_id=token_id)
    if token_id in top:
        entry.logprob = top[token_id]
    ranked = sorted(top.items(), key=lambda item: (-item[1], item[0]))
    entry.top_logprobs.extend(pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in ranked)
    return entry


def finish_reason_name(value: int) -> str | None:
    """The router's name for a proto FinishReason ("stop", ...); None while unspecified."""
    for name, number in _FINISH_REASONS.items():
        if number == value:
            return name
    return None

"""OpenAI request bodies (completions, chat completions) as the router's plain request types.

Every field is checked for its type and range here, and errors name the field as the client
wrote it (`max_completion_tokens`, `messages[2].content`). Fields the OpenAI API defines that
pdserve cannot honour (n > 1, echo, logit_bias, ...) are refused, never silently dropped; fields
it does not define are ignored, as OpenAI-compatible servers do, because clients and load tools
send extras of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.http.errors import ApiError, bad_request
from router.intake import FieldNames, GenerateInput, InvalidArgument, make_sampling_params

MAX_TEMPERATURE = 2.0  # OpenAI's bound
# seed and priority take the ranges of the gRPC API's int64 and int32.


@dataclass(frozen=True)
class ApiRequest:
    """One parsed OpenAI request: what to generate, and how to answer."""

    checked: GenerateInput
    names: FieldNames  # the body's field names, for errors found after parsing
    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None  # top logprobs to report per token (0: the chosen token's only)
    model: str  # the name the client sent ("" = the default)


class Body:
    """Typed access to a JSON object's fields; a wrong type is a 400 naming the field.

    A field set to null counts as absent, as the OpenAI API treats it.
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def has(self, name: str) -> bool:
        return self.fields.get(name) is not None

    def string(self, name: str, default: str | None = None) -> str | None:
        return self._typed(name, (str,), "a string", default)

    def boolean(self, name: str, default: bool) -> bool:
        return self._typed(name, (bool,), "a boolean", default)

    def integer(self, name: str, default: int | None = None, low: int | None = None,
                high: int | None = None) -> int | None:
        value = self._typed(name, (int,), "an integer", default)
        return _in_range(name, value, low, high)

    def number(self, name: str, default: float | None = None, low: float | None = None,
               high: float | None = None) -> float | None:
        value = self._typed(name, (int, float), "a number", default)
        try:
            value = None if value is None else float(value)
        except OverflowError as exc:  # an integer literal past any float
            raise bad_request(name, "is too large a number") from exc
        return _in_range(name, value, low, high)

    def object(self, name: str) -> "Body":
        return Body(self._typed(name, (dict,), "an object", {}))

    def _typed(self, name: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        value = self.fields.get(name)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in kinds:  # JSON true is not the number 1
            raise bad_request(name, f"must be {what}, got a boolean")
        if not isinstance(value, kinds):
            raise bad_request(name, f"must be {what}, got {_json_type(value)}")
        return value


def parse_completion(fields: Any) -> ApiRequest:
    """POST /v1/completions."""
    body = _body(fields)
    _refuse_unsupported(body)
    if body.boolean("echo", False):
        raise bad_request("echo", "echoing the prompt is not supported")
    if body.has("suffix"):
        raise bad_request("suffix", "suffixes are not supported")
    if body.integer("best_of", 1, low=1) != 1:
        raise bad_request("best_of", "only best_of=1 is supported")
    prompt, token_ids = _prompt(body.fields.get("prompt"))
    logprobs = body.integer("logprobs", None, low=0, high=20)
    names = FieldNames(prompt="prompt", messages="messages", token_ids="prompt",
                       max_tokens="max_tokens", stop_token_ids="stop_token_ids", stop="stop",
                       logprobs="logprobs")
    checked = _checked(body, names, logprobs, "logprobs", prompt=prompt, token_ids=token_ids)
    return _request(body, checked, names, chat=False, logprobs=logprobs)


def parse_chat(fields: Any) -> ApiRequest:
    """POST /v1/chat/completions."""
    body = _body(fields)
    _refuse_unsupported(body)
    rf = body.object("response_format")
    if rf.fields and rf.string("type", "text") != "text":
        raise bad_request("response_format", "only the text response format is supported")
    messages = _messages(body.fields.get("messages"))
    logprobs = None
    top = body.integer("top_logprobs", None, low=0, high=20)
    if body.boolean("logprobs", False):
        logprobs = top or 0
    elif top is not None:
        raise bad_request("top_logprobs", "needs logprobs set to true")
    name = "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens"
    names = FieldNames(prompt="prompt", messages="messages", token_ids="messages",
                       max_tokens=name, stop_token_ids="stop_token_ids", stop="stop",
                       logprobs="top_logprobs")
    checked = _checked(body, names, logprobs, "top_logprobs", messages=messages)
    return _request(body, checked, names, chat=True, logprobs=logprobs)


def _body(fields: Any) -> Body:
    if not isinstance(fields, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {_json_type(fields)}")
    return Body(fields)


def _refuse_unsupported(body: Body) -> None:
    if body.integer("n", 1, low=1) != 1:
        raise bad_request("n", "only n=1 is supported; send one request per completion")
    if body.object("logit_bias").fields:
        raise bad_request("logit_bias", "logit biases are not supported")


def _checked(body: Body, names: FieldNames, logprobs: int | None, logprobs_field: str,
             **source: Any) -> GenerateInput:
    max_tokens = body.integer(names.max_tokens, None)
    temperature = body.number("temperature", None, high=MAX_TEMPERATURE)
    kwargs: dict[str, Any] = {
        "temperature": temperature, "top_p": body.number("top_p", None), "top_k": body.integer("top_k", None),
        "min_p": body.number("min_p", None), "seed": body.integer("seed", None, low=-2**63, high=2**63 - 1),
        "repetition_penalty": body.number("repetition_penalty", None),
        "presence_penalty": body.number("presence_penalty", None),
        "frequency_penalty": body.number("frequency_penalty", None),
        "ignore_eos": body.boolean("ignore_eos", False),
        "include_stop_str_in_output": body.boolean("include_stop_str_in_output", False),
        "stop": _stop(body.fields.get("stop")), "stop_token_ids": _token_ids(body, "stop_token_ids"),
        "max_tokens": max_tokens, "logprobs": logprobs,
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    http_name = {"max_tokens": names.max_tokens, "logprobs": logprobs_field}
    params = make_sampling_params(kwargs, lambda field: http_name.get(field, field))
    return GenerateInput(request_id="", model=body.string("model", "") or "", params=params,
                         max_tokens_explicit=max_tokens is not None,
                         priority=body.integer("priority", 0, low=-2**31, high=2**31 - 1) or 0, **source)


def _request(body: Body, checked: GenerateInput, names: FieldNames, chat: bool,
             logprobs: int | None) -> ApiRequest:
    stream = body.boolean("stream", False)
    options = body.object("stream_options")
    include_usage = options.boolean("include_usage", False)
    if options.fields and not stream:
        raise bad_request("stream_options", "only allowed when stream is true")
    return ApiRequest(checked, names, chat, stream, include_usage, logprobs, checked.model)


def _prompt(value: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """A prompt: text, token ids, or a batch of one of either."""
    if value is None:
        raise bad_request("prompt", "is required")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise bad_request("prompt", "must not be empty")
        return value, None
    if isinstance(value, list):
        if not value:
            raise bad_request("prompt", "must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return None, tuple(value)
        if all(isinstance(p, (str, list)) for p in value):
            raise bad_request("prompt", "batches of several prompts are not supported; send one per request")
    raise bad_request("prompt", "must be a string, a list of token ids, or a list of one of either")


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        raise bad_request("messages", "is required")
    if not isinstance(value, list):
        raise bad_request("messages", f"must be a list of messages, got {_json_type(value)}")
    if not value:
        raise bad_request("messages", "must not be empty")
    return tuple(_message(i, m) for i, m in enumerate(value))


def _message(i: int, message: Any) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(where, f"must be an object, got {_json_type(message)}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise bad_request(f"{where}.role", "must be a non-empty string")
    content = message.get("content")
    if content is None:  # an assistant turn that only called tools
        return role, ""
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content", f"must be a string or a list of parts, got {_json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                      "are supported")
        texts.append(part["text"])
    return role, "".join(texts)


def _stop(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_request("stop", "must be a string or a list of strings")


def _token_ids(body: Body, name: str) -> tuple[int, ...] | None:
    value = body.fields.get(name)
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    raise bad_request(name, "must be a list of integers")


def _in_range(name: str, value: Any, low: Any, high: Any) -> Any:
    if value is None:
        return None
    if low is not None and value < low:
        raise bad_request(name, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise bad_request(name, f"must be at most {high}, got {value}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def api_error(exc: InvalidArgument) -> ApiError:
    """An InvalidArgument from intake as OpenAI's error (404 for an unknown model)."""
    from router.intake import UnknownModel

    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc.reason), exc.field, "model_not_found")
    return bad_request(exc.field, exc.reason)

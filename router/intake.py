"""Admission checks shared by the router's front doors (gRPC and HTTP): step 1 of a request's life.

A front door parses its wire format into a GenerateInput (everything that needs neither the
tokenizer nor the cluster); Intake then checks the model, tokenizes, checks token ids against the
vocabulary and fits prompt + max_tokens into the context. Errors are InvalidArgument naming the
offending field in the front door's own words (FieldNames), so each door reports them its way.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from router.limits import RequestLimits


class InvalidArgument(ValueError):
    """A request field is invalid; `field` is its path in the front door's request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class UnknownModel(InvalidArgument):
    """The request names a model this router does not serve (HTTP answers 404)."""


@dataclass(frozen=True)
class FieldNames:
    """Where a front door's request keeps the fields Intake checks, for error messages."""

    model: str = "model"
    prompt: str = "prompt"
    messages: str = "chat"
    token_ids: str = "token_ids.ids"
    max_tokens: str = "sampling_params.max_tokens"
    stop_token_ids: str = "sampling_params.stop_token_ids"
    stop: str = "sampling_params.stop"
    logprobs: str = "sampling_params.logprobs"


GRPC_FIELDS = FieldNames()


@dataclass(frozen=True)
class GenerateInput:
    """A request, checked for everything that needs neither tokenizer nor backend.

    Exactly one of prompt, messages, token_ids is set.
    """

    request_id: str  # "" when the client left it to the server
    model: str  # "" = the default model
    params: SamplingParams
    max_tokens_explicit: bool  # False: the server picks max_tokens (the context's room, or its default)
    priority: int = 0  # admission order while queued: lower first
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    token_ids: tuple[int, ...] | None = None

    @property
    def input_field(self) -> str:
        """The gRPC request field the input came from, for error messages."""
        return input_field(self, GRPC_FIELDS)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages or ()]


def input_field(checked: GenerateInput, names: FieldNames) -> str:
    if checked.prompt is not None:
        return names.prompt
    return names.messages if checked.messages is not None else names.token_ids


@dataclass(frozen=True)
class AdmittedRequest:
    """A request ready for the backend: tokenized, fitted to the context, with its own id."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    admitted_at: float  # time.monotonic() when the front door received it
    owner: str = ""  # Gatekeeper.owner of its client: who may resume the stream
    max_tokens_explicit: bool = True  # False: the server chose max_tokens (the context's room)


def make_sampling_params(kwargs: dict[str, Any], field_name: Callable[[str], str]) -> SamplingParams:
    """SamplingParams(**kwargs), its own validation reported as InvalidArgument naming the
    first field it rejects (field_name maps a SamplingParams field to the request's field)."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise InvalidArgument(field_name(_culprit(kwargs)), str(exc)) from exc


def _culprit(kwargs: dict[str, Any]) -> str:
    """The first field that SamplingParams rejects on its own (its checks are per field)."""
    names = {f.name for f in fields(SamplingParams)}
    for name, value in kwargs.items():
        if name not in names:
            continue
        try:
            SamplingParams(**{name: value})
        except ValueError:
            return name
    return "*"


# Texts at least this long are tokenized off the event loop (admit_async); shorter ones take less
# time than a thread hop would.
OFF_LOOP_CHARS = 16 * 1024


def text_size(checked: GenerateInput) -> int:
    """Characters the tokenizer will read: the prompt's or the messages' contents."""
    if checked.prompt is not None:
        return len(checked.prompt)
    return sum(len(content) for _, content in checked.messages or ())


class Intake:
    """Model check, tokenization and context fit, against one backend and tokenizer.

    tokenizer is duck-typed: encode(text) -> ids, apply_chat_template(messages,
    add_generation_prompt=True) -> ids, vocab_size. A request without max_tokens may run to the
    end of the context, or to default_max_tokens when the server sets one (as vLLM does).
    """

    def __init__(self, backend: Any, tokenizer: Any, default_max_tokens: int | None = None,
                 names: FieldNames = GRPC_FIELDS, limits: "RequestLimits | None" = None) -> None:
        if default_max_tokens is not None and default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.default_max_tokens = default_max_tokens
        self.names = names
        self.limits = limits  # router.limits.RequestLimits: stop lists, logprobs, prompt length

    def with_names(self, names: FieldNames) -> "Intake":
        return Intake(self.backend, self.tokenizer, self.default_max_tokens, names, self.limits)

    def admit(self, checked: GenerateInput, admitted_at: float | None = None) -> AdmittedRequest:
        """Validate and tokenize; raises InvalidArgument naming the offending field."""
        admitted_at = time.monotonic() if admitted_at is None else admitted_at
        self.check_model(checked.model)
        return self._admit_tokenized(checked, self._tokenize(checked), admitted_at)

    def _admit_tokenized(self, checked: GenerateInput, prompt_ids: list[int], admitted_at: float) -> AdmittedRequest:
        self._check_token_range(self.names.stop_token_ids, checked.params.stop_token_ids)
        if self.limits is not None:
            self.limits.check_params(checked.params, self.names)
            self.limits.check_prompt_tokens(len(prompt_ids), input_field(checked, self.names))
        params = self._fit_context(checked, len(prompt_ids))
        request_id = checked.request_id or f"req-{uuid.uuid4().hex}"
        return AdmittedRequest(request_id, prompt_ids, params, checked.priority, admitted_at,
                               max_tokens_explicit=checked.max_tokens_explicit)

    async def admit_async(self, checked: GenerateInput, admitted_at: float | None = None) -> AdmittedRequest:
        """admit(), with the tokenizing in a worker thread when the text is long enough that it
        would hold up every other stream on the event loop (about 6 ms for 16 KB; the largest
        body a front door takes, 4 MiB, takes seconds). Only the tokenizer runs there (it lets
        go of the GIL for long texts); the checks read the cluster's state on the loop."""
        if text_size(checked) < OFF_LOOP_CHARS:
            return self.admit(checked, admitted_at)
        admitted_at = time.monotonic() if admitted_at is None else admitted_at
        self.check_model(checked.model)
        prompt_ids = await asyncio.to_thread(self._tokenize, checked)
        return self._admit_tokenized(checked, prompt_ids, admitted_at)

    def check_model(self, model: str) -> None:
        served = self.backend.model_names()
        if model and model not in served:
            raise UnknownModel(self.names.model, f"unknown model {model!r}; served: {', '.join(served)}")

    def _tokenize(self, checked: GenerateInput) -> list[int]:
        if checked.token_ids is not None:
            self._check_token_range(self.names.token_ids, checked.token_ids)
            return list(checked.token_ids)
        field = input_field(checked, self.names)
        if checked.prompt is not None:
            ids = self.tokenizer.encode(checked.prompt)
        else:
            try:
                ids = self.tokenizer.apply_chat_template(checked.chat_messages(), add_generation_prompt=True)
            except Exception as exc:  # a template rejects bad role orders with its own errors
                raise InvalidArgument(field, f"chat template failed: {exc}") from exc
        if isinstance(ids, Mapping):  # HF tokenizers may return an encoding dict
            ids = ids["input_ids"]
        if not ids:
            raise InvalidArgument(field, "tokenizes to no tokens")
        return [int(t) for t in ids]

    def _check_token_range(self, field: str, ids: tuple[int, ...]) -> None:
        vocab_size = self.tokenizer.vocab_size
        for i, token_id in enumerate(ids):
            if not 0 <= token_id < vocab_size:
                raise InvalidArgument(f"{field}[{i}]", f"token id {token_id} is outside [0, {vocab_size})")

    def _fit_context(self, checked: GenerateInput, prompt_len: int) -> SamplingParams:
        """Check prompt + max_tokens against the context; a request without max_tokens gets the
        room left in the context (or the server's default, when smaller)."""
        max_len = self.backend.max_model_len
        if prompt_len >= max_len:
            raise InvalidArgument(input_field(checked, self.names),
                                  f"prompt has {prompt_len} tokens; the model's context is {max_len} tokens")
        params, room = checked.params, max_len - prompt_len
        if checked.max_tokens_explicit:
            if params.max_tokens > room:
                raise InvalidArgument(
                    self.names.max_tokens,
                    f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                    f"model's context of {max_len} tokens")
            return params
        # A defaulted request must also fit the largest KV cache, which may hold less than a
        # whole context: it then runs as far as the cache allows instead of being refused.
        largest = getattr(self.backend, "largest_kv_tokens", lambda: None)()
        if largest is not None and largest > prompt_len:
            room = min(room, largest - prompt_len)
        if self.default_max_tokens is not None:
            room = min(room, self.default_max_tokens)
        return replace(params, max_tokens=room)

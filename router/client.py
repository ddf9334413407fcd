"""A small command-line client for the Generation service: streams text to stdout as it comes.

The CLI mounts it as a subcommand via add_client_arguments() + run_client_from_args(); it also
runs standalone through client_main(argv).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TextIO

import grpc

from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from engine.sampling_params import SamplingParams
from router.convert import finish_reason_name, sampling_params_to_proto

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


@dataclass(frozen=True)
class Connection:
    """How to reach a server: its API key and TLS files (all optional)."""

    api_key: str | None = None
    tls_ca: str | None = None  # trust this CA (with TLS on); None with tls: the system's roots
    tls_cert: str | None = None  # client certificate, for mutual TLS
    tls_key: str | None = None
    tls: bool = False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def channel(self, target: str) -> grpc.Channel:
        if not (self.tls or self.tls_ca or self.tls_cert):
            return grpc.insecure_channel(target)
        from router.security.tls import client_credentials

        return grpc.secure_channel(target, client_credentials(self.tls_ca, self.tls_cert, self.tls_key))


def build_request(
    prompt: str,
    max_tokens: int | None = None,
    temperature: float | None = None,
    chat: bool = False,
    model: str = "",
    system: str | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    params: SamplingParams | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest for one prompt; with chat=True it is sent as a user message.

    A full SamplingParams, when given, replaces max_tokens, temperature, stop and seed.
    """
    if params is not None:
        return _with_input(
            pb.GenerateRequest(model=model, sampling_params=sampling_params_to_proto(params)),
            prompt, chat, system,
        )
    params = pb.SamplingParams(stop=list(stop))
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if temperature is not None:
        params.temperature = temperature
    if seed is not None:
        params.seed = seed
    return _with_input(pb.GenerateRequest(model=model, sampling_params=params), prompt, chat, system)


def _with_input(
    request: pb.GenerateRequest, prompt: str, chat: bool, system: str | None
) -> pb.GenerateRequest:
    if chat:
        messages = [pb.ChatMessage(role="system", content=system)] if system else []
        messages.append(pb.ChatMessage(role="user", content=prompt))
        request.chat.messages.extend(messages)
    else:
        request.prompt = prompt
    return request


def run_client(
    target: str,
    prompt: str,
    max_tokens: int | None = None,
    temperature: float | None = None,
    chat: bool = False,
    model: str = "",
    system: str | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    timeout: float | None = None,
    params: SamplingParams | None = None,
    show_usage: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    connection: Connection = Connection(),
    request_id: str = "",
    resume_from: int | None = None,
) -> int:
    """Stream one generation from the server at target; returns a process exit code.

    Text goes to out (stdout) as it arrives; errors go to err (stderr) as "error: CODE: details".
    """
    out = out or sys.stdout
    err = err or sys.stderr
    request = build_request(prompt, max_tokens, temperature, chat, model, system, stop, seed, params)
    request.request_id = request_id
    if resume_from is not None:
        request.resume_from = resume_from
    last: pb.GenerateResponse | None = None
    with connection.channel(target) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request, timeout=timeout,
                                                        metadata=connection.metadata)
        try:
            for response in call:
                out.write(response.text)
                out.flush()
                last = response
        except grpc.RpcError as exc:
            out.write("\n")
            err.write(f"error: {exc.code().name}: {exc.details()}\n")
            return EXIT_RPC_ERROR
        except KeyboardInterrupt:
            call.cancel()  # the server aborts the request and frees its KV blocks
            out.write("\n")
            err.write("interrupted\n")
            return EXIT_INTERRUPTED
    out.write("\n")
    if show_usage and last is not None:
        err.write(_usage_line(last) + "\n")
    return EXIT_OK


def _usage_line(final: pb.GenerateResponse) -> str:
    usage, timing = final.usage, final.timing
    reason = finish_reason_name(final.finish_reason) or "unknown"
    return (
        f"[{reason}] prompt={usage.prompt_tokens} (cached {usage.cached_prompt_tokens}) "
        f"completion={usage.completion_tokens} ttft={timing.time_to_first_token_ms:.1f}ms "
        f"total={timing.total_time_ms:.1f}ms"
    )


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to complete (or the user message with --chat)")
    parser.add_argument("--target", default="localhost:50051", help="host:port of the gRPC server")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--model", default="", help="model name; default: the served model")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--usage", action="store_true", help="print token counts and timing")
    parser.add_argument("--request-id", default="", help="the request's id (default: the server picks one)")
    parser.add_argument("--resume-from", type=int, default=None, metavar="N",
                        help="resume request --request-id, begun on a router that died, after the N "
                             "tokens already received")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="API key sent as `authorization: Bearer KEY` (default: $PDSERVE_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="connect over TLS, trusting this CA")
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the client certificate's key")


def run_client_from_args(args: argparse.Namespace) -> int:
    return run_client(
        target=args.target,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        chat=args.chat,
        model=args.model,
        system=args.system,
        stop=args.stop,
        seed=args.seed,
        timeout=args.timeout,
        show_usage=args.usage,
        connection=Connection(args.api_key, args.tls_ca, args.tls_cert, args.tls_key, args.tls),
        request_id=args.request_id,
        resume_from=args.resume_from,
    )


def client_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream a generation from a pdserve router.")
    add_client_arguments(parser)
    return run_client_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(client_main())

"""The security and limit flags of `pdserve serve`, and the settings they make."""
from __future__ import annotations

import argparse
import os

from cluster_state.rate_limits import RateLimit
from router.limits import RequestLimits
from router.security.api_keys import API_KEY_ENV, ApiKeys
from router.security.config import SecurityConfig
from router.security.tls import TlsFiles


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("security")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this API key (repeatable); clients send `Authorization: Bearer KEY`. "
                        f"Also ${API_KEY_ENV}. Without any key the server is open")
    g.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="accept the keys in this file, one per line ('#' starts a comment; repeatable)")
    g.add_argument("--rate-limit-rpm", type=int, default=0, metavar="N",
                   help="requests per minute per API key (per client address without keys), shared "
                        "by every router of the cluster; 0 = unlimited (default)")
    g.add_argument("--rate-limit-tpm", type=int, default=0, metavar="N",
                   help="tokens per minute per API key: prompt + max_tokens taken at admission, the "
                        "unused max_tokens given back at the end; 0 = unlimited (default)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="serve TLS with this certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    g.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    limits = RequestLimits()
    lg = parser.add_argument_group("request limits")
    lg.add_argument("--max-message-bytes", type=int, default=limits.max_message_bytes,
                    help=f"largest gRPC request message (default {limits.max_message_bytes})")
    lg.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="longest prompt in tokens (default: the model's context)")
    lg.add_argument("--max-stop-strings", type=int, default=limits.max_stop_strings,
                    help=f"stop strings per request (default {limits.max_stop_strings})")
    lg.add_argument("--max-stop-string-chars", type=int, default=limits.max_stop_string_chars,
                    help=f"characters per stop string (default {limits.max_stop_string_chars})")
    lg.add_argument("--max-stop-token-ids", type=int, default=limits.max_stop_token_ids,
                    help=f"stop token ids per request (default {limits.max_stop_token_ids})")
    lg.add_argument("--max-logprobs", type=int, default=limits.max_logprobs,
                    help=f"top logprobs per token a request may ask (default {limits.max_logprobs})")
    lg.add_argument("--max-streams-per-connection", type=int, default=limits.max_streams_per_connection,
                    help="Generate streams one gRPC connection (or one HTTP client address) may hold "
                         f"open; more get RESOURCE_EXHAUSTED / 429 (default {limits.max_streams_per_connection})")


def security_from_args(args: argparse.Namespace) -> SecurityConfig:
    """ValueError on a bad combination or an unreadable key file."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    keys = ApiKeys.gather(args.api_key, args.api_key_file, os.environ.get(API_KEY_ENV))
    return SecurityConfig(keys, RateLimit(args.rate_limit_rpm, args.rate_limit_tpm), tls)


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(
        max_message_bytes=args.max_message_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
        max_stop_token_ids=args.max_stop_token_ids, max_logprobs=args.max_logprobs,
        max_streams_per_connection=args.max_streams_per_connection)

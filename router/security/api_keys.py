"""API keys: the set a router accepts, read from flags, a file or the environment.

Clients send a key as the OpenAI API has them do: `Authorization: Bearer KEY` (gRPC metadata
`authorization`, an HTTP header). Keys are compared in constant time, and against every accepted
key, so neither the time of a refusal nor which key matched leaks anything. No keys configured
means an open server.
"""
from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

API_KEY_ENV = "PDSERVE_API_KEY"


class Unauthenticated(Exception):
    """The request carries no key, or one this router does not accept."""


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` value; None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--api-key-file {path}: cannot read it: {err}") from err
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: holds no key (one per line, '#' starts a comment)")
    return keys


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in self.keys:
            if not key or any(c.isspace() for c in key) or not key.isprintable():
                raise ValueError("an API key must be printable and without spaces")

    @classmethod
    def gather(cls, keys: Iterable[str] = (), files: Iterable[str] = (), env: str | None = None) -> "ApiKeys":
        """Keys given on the command line, in key files, and in $PDSERVE_API_KEY (`env`)."""
        gathered = list(keys)
        for path in files:
            gathered += read_key_file(path)
        if env:
            gathered.append(env.strip())
        return cls(tuple(dict.fromkeys(gathered)))

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def verify(self, presented: str | None) -> None:
        """Raise Unauthenticated unless `presented` is an accepted key (or none is required)."""
        if not self.required:
            return
        if presented is None:
            raise Unauthenticated("an API key is required: send `authorization: Bearer KEY`")
        given = presented.encode()
        matched = False
        for key in self.keys:  # every key, always: the time does not tell which one matched
            matched |= hmac.compare_digest(given, key.encode())
        if not matched:
            raise Unauthenticated("the API key is not valid")

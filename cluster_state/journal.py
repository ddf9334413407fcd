"""The request journal: what a stream has produced, so that another router can take it over.

A router writes, for each request it streams, the prompt, the sampling parameters and where the
request runs when it is placed, then appends every token *before* sending it to the client, and
the finish reason at the end. When the router dies, the client sends the same request id to
another router with the number of tokens it has (`resume_from`); that router reads the journal,
sends the tokens the client lacks, and (when the request had not finished) continues it on a
worker with the journal's tokens as the request's outputs so far. Every token reaches the client
exactly once, because none is sent before it is journaled.

Keys (all under the cluster's prefix, expiring `ttl_s` after the last write):
    journal:{id}          hash: prompt (packed uint32), params (JSON), router, placement (JSON), finish
    journal:{id}:tokens   string: the output tokens so far, packed uint32, appended per delta
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from cluster_state.keys import ClusterKeys

JOURNAL_TTL_S = 300.0  # a stream can be resumed this long after its last token


def _pack(token_ids) -> bytes:
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def _unpack(blob: bytes | None) -> list[int]:
    if not blob:
        return []
    if len(blob) % 4:
        raise ValueError(f"a journal token list has {len(blob)} bytes, not a multiple of 4")
    return list(struct.unpack(f"<{len(blob) // 4}I", blob))


@dataclass(frozen=True)
class JournalEntry:
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # engine SamplingParams' fields (this package imports no engine)
    router_id: str
    output_token_ids: list[int]
    finish_reason: str | None
    placement: dict  # {"worker": worker id, "request": the id on that worker}, when placed
    owner: str = ""  # who may resume it: a digest of the client's API key ("" where keys are off)


class RequestJournal:
    def __init__(self, redis, keys: ClusterKeys, router_id: str, ttl_s: float = JOURNAL_TTL_S) -> None:
        self.redis = redis
        self.keys = keys
        self.router_id = router_id
        self.ttl_ms = int(ttl_s * 1000)

    def _key(self, request_id: str) -> str:
        return self.keys.journal(request_id)

    async def begin(self, request_id: str, prompt_token_ids: list[int], params: dict,
                    output_token_ids: list[int] = (), owner: str = "") -> None:
        """A new stream (or one this router took over: it starts with the tokens it resumed)."""
        key = self._key(request_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key, key + ":tokens")
        pipe.hset(key, mapping={"prompt": _pack(prompt_token_ids), "params": json.dumps(params),
                                "router": self.router_id, "owner": owner})
        if output_token_ids:
            pipe.set(key + ":tokens", _pack(output_token_ids))
        pipe.pexpire(key, self.ttl_ms)
        pipe.pexpire(key + ":tokens", self.ttl_ms)
        await pipe.execute()

    async def placed(self, request_id: str, worker_id: str, worker_request_id: str) -> None:
        await self.redis.hset(self._key(request_id), "placement",
                              json.dumps({"worker": worker_id, "request": worker_request_id}))

    async def append(self, records: list[tuple[str, tuple[int, ...], str | None]]) -> None:
        """Record (request id, new tokens, finish reason or None) of several streams in one round
        trip, before any of those tokens is sent to a client."""
        pipe = self.redis.pipeline(transaction=False)
        for request_id, token_ids, finish_reason in records:
            key = self._key(request_id)
            if token_ids:
                pipe.append(key + ":tokens", _pack(token_ids))
            if finish_reason is not None:
                pipe.hset(key, "finish", finish_reason)
            pipe.pexpire(key, self.ttl_ms)
            pipe.pexpire(key + ":tokens", self.ttl_ms)
        await pipe.execute()

    async def read(self, request_id: str) -> JournalEntry | None:
        key = self._key(request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.get(key + ":tokens")
        fields, tokens = await pipe.execute()
        if not fields:
            return None
        finish = fields.get(b"finish")
        return JournalEntry(request_id, _unpack(fields[b"prompt"]), json.loads(fields[b"params"]),
                            fields[b"router"].decode(), _unpack(tokens), finish.decode() if finish else None,
                            json.loads(fields[b"placement"]) if b"placement" in fields else {},
                            fields.get(b"owner", b"").decode())

    async def forget(self, request_id: str) -> None:
        key = self._key(request_id)
        await self.redis.delete(key, key + ":tokens")

"""JSON for the small frozen dataclasses kept in Redis (records, load reports, the pool spec).

Reading ignores fields it does not know, so a router and a worker of different versions still
understand each other's records.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TypeVar

T = TypeVar("T", bound="JsonRecord")


class JsonRecord:
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls: type[T], text: str | bytes) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in names})

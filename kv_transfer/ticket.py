"""Transfer tickets (what a decode worker hands a prefill worker) and per-request transfer state."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class TransferState(enum.IntEnum):
    """Ordered: a request only moves forward, PENDING -> IN_PROGRESS -> DONE or FAILED."""

    PENDING = 0  # ticket issued, no bytes landed yet
    IN_PROGRESS = 1  # at least one chunk landed
    DONE = 2  # the sender said done and every (layer, block) of the ticket landed
    FAILED = 3  # sender reported failure, peer vanished, or data was incomplete

    def __str__(self) -> str:
        return self.name

    @property
    def finished(self) -> bool:
        return self >= TransferState.DONE


@dataclass(frozen=True)
class TransferTicket:
    """Where a request's KV must land: issued by the receiver, carried to the sender.

    Invariant: `block_ids` are distinct blocks of the receiver's cache, reserved for this request
    under `lease_id` until the transfer finishes or the lease lapses. Block i of the ticket holds
    tokens [first_token + i * block_size, first_token + (i + 1) * block_size) of the prompt;
    `first_token` is non-zero when the receiver already caches a prefix.
    """

    request_id: str
    endpoint: str  # the receiver's control endpoint, "host:port"
    block_ids: tuple[int, ...]
    num_tokens: int  # prompt tokens whose KV will arrive
    lease_id: str
    first_token: int = 0
    generation: int = 0  # the issuing receiver's incarnation; another incarnation refuses it

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(int(b) for b in self.block_ids))
        if len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError(f"ticket {self.request_id}: block_ids repeat a block")
        if any(b < 0 for b in self.block_ids):
            raise ValueError(f"ticket {self.request_id}: negative block id")

"""What a worker reports about its load, at least every publish interval, so every router sees the
same picture. The rates come from the worker's own measured step times (fitted online), so the
router's cost predictions follow the hardware it actually runs on."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster_state.records import JsonRecord


@dataclass(frozen=True)
class LoadReport(JsonRecord):
    num_running: int = 0  # requests that compute (prefill or decode) in the running batch
    num_waiting: int = 0  # requests in the engine's own queue (admitted, not scheduled yet)
    num_waiting_for_kv: int = 0  # decode side: blocks held while KV arrives
    num_unfinished: int = 0  # every request the engine holds; a decode worker admits up to max_num_seqs
    max_num_seqs: int = 1
    num_free_blocks: int = 0
    num_blocks: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens admitted here and not computed yet
    max_num_batched_tokens: int = 512  # a prefill here runs in chunks of at most this many tokens
    # Fitted step cost: a step computing P prefill tokens and D decode rows takes about
    # step_base_s + (mixed_step_s if P else 0) + P * prefill_s_per_token + D * decode_s_per_seq.
    step_base_s: float = 0.0
    mixed_step_s: float = 0.0
    prefill_s_per_token: float = 0.0
    decode_s_per_seq: float = 0.0
    step_samples: int = 0  # steps the fit has seen
    transfer_bytes_per_s: float = 0.0  # prefill side: measured KV push bandwidth (0: not measured yet)
    transfer_choices: dict = field(default_factory=dict)  # decode side: tickets per KV backend
    prefix_cache_queries: int = 0  # prompt tokens looked up in this worker's prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found there
    requests_taken: int = 0  # requests taken in since start (every router's), for the arrival rate
    # KV moved by this worker since it started, per transfer backend ("shm", "torch_dist", ...):
    # {"bytes", "seconds", "transfers", "failures"}; the prefill side counts what it pushed, the
    # decode side what it received.
    kv_transfer: dict = field(default_factory=dict)
    published_at: float = 0.0  # wall clock (time.time()) when the engine took the snapshot

    @property
    def free_slots(self) -> int:
        return max(0, self.max_num_seqs - self.num_unfinished)


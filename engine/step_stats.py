"""What a running engine knows about its own load and speed, for whoever places requests on it.

`StepCostModel` fits step time = base + [P > 0] x mixed_step_s + P x prefill_s_per_token +
D x decode_s_per_seq online, from the engine's measured steps (P prefill tokens and D decode rows
each), with exponential forgetting so the fit follows the machine (another process taking a core,
a warm cache). `mixed_step_s` is what a step pays for holding prefill tokens at all: on a CPU a
decode-only step runs one native call while a step with a prefill chunk runs every row through
torch, so a local prefill slows the decodes it joins by far more than its tokens' share. A router
turns the fit into predicted times to first token and decode slowdowns; nothing in the prediction
is a constant of the code.
`EngineLoad` is a snapshot of the queues and the pool, taken on the engine thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Scales that bring the three features to similar sizes, so the ridge term treats them alike.
_SCALE = np.array([1.0, 1.0, 256.0, 16.0])  # (1, mixed, P, D)


@dataclass(frozen=True)
class StepCostFit:
    base_s: float
    mixed_step_s: float
    prefill_s_per_token: float
    decode_s_per_seq: float
    samples: int  # steps observed (before forgetting)

    def step_s(self, prefill_tokens: int, decode_rows: int) -> float:
        return (self.base_s + (self.mixed_step_s if prefill_tokens else 0.0)
                + prefill_tokens * self.prefill_s_per_token + decode_rows * self.decode_s_per_seq)


class StepCostModel:
    """Exponentially weighted least squares over (1, [P > 0], P, D) with a weak ridge toward a prior.

    The prior only matters until a few steps of each kind were seen: a worker that never
    prefills (a decode worker whose prompts all come from prefill workers) keeps the prefill
    rate it measured at calibration, or the prior if it never calibrated.
    """

    def __init__(self, prior: tuple[float, float, float, float] = (0.005, 0.0, 0.002, 0.001),
                 forget: float = 0.99, prior_weight: float = 0.5) -> None:
        self.forget = forget
        self.prior_weight = prior_weight
        self._prior = np.array(prior) * _SCALE  # scaled coefficients
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        self.samples = 0

    def observe(self, prefill_tokens: int, decode_rows: int, seconds: float) -> None:
        x = np.array([1.0, 1.0 if prefill_tokens else 0.0, prefill_tokens / _SCALE[2], decode_rows / _SCALE[3]])
        self._xtx *= self.forget
        self._xty *= self.forget
        self._xtx += np.outer(x, x)
        self._xty += x * seconds
        self.samples += 1

    def fit(self) -> StepCostFit:
        ridge = self.prior_weight * np.eye(4)
        theta = np.linalg.solve(self._xtx + ridge, self._xty + ridge @ self._prior)
        base, mixed, prefill, decode = np.maximum(theta, 0.0) / _SCALE
        return StepCostFit(float(base), float(mixed), float(prefill), float(decode), self.samples)


@dataclass(frozen=True)
class EngineLoad:
    num_running: int  # computing requests in the running batch
    num_waiting: int  # queued, not scheduled yet
    num_waiting_for_kv: int
    num_unfinished: int
    max_num_seqs: int
    num_free_blocks: int
    num_blocks: int
    queued_prefill_tokens: int  # prompt tokens admitted and not computed yet
    max_num_batched_tokens: int  # the step budget: a prefill runs in chunks of at most this
    step_base_s: float
    mixed_step_s: float
    prefill_s_per_token: float
    decode_s_per_seq: float
    step_samples: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found there
    requests_taken: int = 0  # requests taken in since start: their rate is the worker's arrival rate
    taken_at: float = 0.0  # wall clock (time.time()) of the snapshot

"""Conditional disaggregation: prefill a request on its decode worker, or on a prefill worker.

`auto` predicts the time to first token both ways and takes the smaller, where a local prefill
also pays for the delay it adds to decoding on that worker, times the stall weight:
    local  = queued prefill there + uncached tokens there x its prefill rate
             + weight x (the stall of the requests decoding there now
                         + the expected delay of those arriving while it runs, at the measured rate)
    remote = queued prefill on the prefill worker + its uncached tokens x its rate
             + moving the decode worker's uncached blocks at the measured transfer rate
The stall weight (default 4) is what one second of stall in a decoding stream costs against one
second of this request's wait for its first token. At 1 a long prompt is prefilled beside
running decodes whenever that saves its own first token a little more than it stalls the
others; the stalls land in the middle of streams and show in their time per output token, which
is what disaggregation exists to keep steady. At 4 a decode worker prefills itself when it is
idle (and few requests are expected during the prefill) or when the prompt is short and the
prefill worker's queue is long; higher values approach `always`. The rates are the workers' own
fits to their measured steps. What the prediction misses (the extra hop of a remote prefill, a
worker slower than its fit) is learned per path from observed times to first token. `always`
and `never` skip the prediction. Every decision is counted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from router.pools.handle import WorkerHandle
from router.routing import cost
from router.routing.policies import RoutingRequest

MODES = ("auto", "always", "never")
DEFAULT_STALL_WEIGHT = 4.0


@dataclass(frozen=True)
class PrefillPlan:
    remote: bool
    local_ttft_s: float  # predicted time to first token of a local prefill
    remote_ttft_s: float  # ... of a remote one (inf without a prefill worker)
    stall_s: float  # what a local prefill adds to the latency of the requests decoding now, in total
    reason: str  # "auto" | "always" | "never" | "no prefill worker"
    bias_s: float = 0.0  # the learned correction included in the chosen path's prediction
    arrivals_stall_s: float = 0.0  # ... to the requests expected to arrive while it runs

    @property
    def predicted_ttft_s(self) -> float:
        return self.remote_ttft_s if self.remote else self.local_ttft_s


class PathBias:
    """Observed minus predicted time to first token, per path, fitted as a + b x predicted.

    A fit over exponentially weighted recent requests (each new one weighs `1 / (1 - decay)`
    times the one before it, the same share `weight` of the whole as a moving average's), so a
    correction learned where predictions are long does not land whole on short ones: a prompt
    whose prefill the step fit underestimates by 30 % (long prompts, whose attention the linear
    fit does not see) moves the correction of a 14-token prompt by 30 % of its own small
    prediction, not by the long prompt's 600 ms. The intercept carries the fixed extra cost of a
    path (the remote path's two actor calls and the first token's trip); a weak prior (half a
    request) keeps it near `remote_hop_s` and the slope near 0 until requests of different sizes
    tell them apart. The slope stays within [-0.5, 2], so that a run of requests of one size
    cannot tilt the fit steeply.
    """

    PRIOR = 0.5  # weight of the prior, in requests (for the slope, requests at a 1 s prediction)
    SLOPE_RANGE = (-0.5, 2.0)

    def __init__(self, weight: float = 0.1, remote_hop_s: float = 0.005) -> None:
        self.decay = 1.0 - weight
        self.prior = {True: remote_hop_s, False: 0.0}  # remote? -> intercept before any request
        self.sums = {path: [0.0] * 5 for path in (True, False)}  # weights, x, x^2, error, x error
        self.fit = {path: (self.prior[path], 0.0) for path in (True, False)}  # (intercept s, slope)

    def correction(self, remote: bool, predicted_s: float) -> float:
        """Seconds to add to a prediction of `predicted_s` for this path (never below 0 in sum)."""
        intercept, slope = self.fit[remote]
        return max(intercept + slope * predicted_s, -predicted_s)

    def observe(self, remote: bool, predicted_s: float, observed_s: float) -> None:
        error, x = observed_s - predicted_s, predicted_s
        sums = self.sums[remote]
        for i, value in enumerate((1.0, x, x * x, error, x * error)):
            sums[i] = self.decay * sums[i] + value
        w, sx, sxx, se, sxe = sums
        # Weighted least squares with the prior as PRIOR extra requests: intercept at the prior,
        # slope 0 at x = 1 s. Two equations, two unknowns.
        a11, a12, b1 = w + self.PRIOR, sx, se + self.PRIOR * self.prior[remote]
        a21, a22, b2 = sx, sxx + self.PRIOR, sxe
        det = a11 * a22 - a12 * a21  # > 0: both diagonals exceed the off-diagonal (Cauchy-Schwarz)
        slope = min(max((a11 * b2 - a21 * b1) / det, self.SLOPE_RANGE[0]), self.SLOPE_RANGE[1])
        intercept = (b1 - a12 * slope) / a11
        self.fit[remote] = (intercept, slope)


class DisaggregationPolicy:
    def __init__(self, mode: str = "auto", stall_weight: float = DEFAULT_STALL_WEIGHT) -> None:
        if mode not in MODES:
            raise ValueError(f"disaggregation must be one of {', '.join(MODES)}, got {mode!r}")
        if not stall_weight >= 0:
            raise ValueError(f"the decode stall weight must be 0 or more, got {stall_weight}")
        self.mode = mode
        self.stall_weight = stall_weight
        self.bias = PathBias()
        self.decisions: Counter[str] = Counter()  # "local" / "remote" by reason, e.g. "remote:auto"

    def plan(self, request: RoutingRequest, decode: WorkerHandle, prefill: WorkerHandle | None) -> PrefillPlan:
        tokens = request.uncached_tokens(decode)
        local_s = cost.queued_prefill_s(decode) + cost.marginal_prefill_s(decode, tokens)
        stall_s, arrivals_s = cost.running_stall_s(decode, tokens), cost.arrivals_stall_s(decode, tokens)
        corrections = {False: self.bias.correction(False, local_s), True: 0.0}
        remote_s = float("inf")
        if prefill is not None:
            remote_s = (cost.queued_prefill_s(prefill) + cost.prefill_s(prefill, request.uncached_tokens(prefill))
                        + cost.transfer_s(prefill, decode, tokens))
            corrections[True] = self.bias.correction(True, remote_s)
            remote_s += corrections[True]
        local_s += corrections[False]
        if prefill is None:
            remote, reason = False, "no prefill worker"
        elif self.mode == "auto":
            remote, reason = remote_s < local_s + self.stall_weight * (stall_s + arrivals_s), "auto"
        else:
            remote, reason = self.mode == "always", self.mode
        self.decisions[f"{'remote' if remote else 'local'}:{reason}"] += 1
        return PrefillPlan(remote, local_s, remote_s, stall_s, reason, corrections[remote], arrivals_s)

    def observe(self, plan: PrefillPlan, observed_s: float) -> None:
        """A request's placement-to-first-token time, for the path it took."""
        if plan.reason in ("auto", "always", "never"):
            self.bias.observe(plan.remote, plan.predicted_ttft_s - plan.bias_s, observed_s)

"""Choosing the next token of every running request from its logits row.

The all-greedy batch without penalties or logprobs is the common case (reference checks,
benchmarks) and costs one argmax over the batch. Any other row goes through a short per-row
pipeline: penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    # Per row: {chosen id: logprob, then the top-n ids by logprob, best first} when the request
    # asked for logprobs, else None. Logprobs are of the raw model distribution.
    logprobs: list[dict[int, float] | None]


def _is_plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and not params.has_penalties and params.logprobs is None


class Sampler:
    """Stateless except for the per-request generators it attaches to seeded requests."""

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[Request], argmax: Sequence[int] | None = None
    ) -> SamplerOutput:
        """logits: (num_rows, vocab) float32, row i belonging to requests[i]. argmax: each row's
        argmax when the caller has it already (the native decode step finds it while writing
        the logits), else None."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"expected logits of shape ({len(requests)}, vocab), got {tuple(logits.shape)}")
        if all(_is_plain_greedy(r.sampling_params) for r in requests):
            if argmax is None:
                # argmax returns the first maximal index: ties go to the lowest id. On the CPU,
                # numpy's single-threaded argmax of a few rows takes a sixth of torch's (which
                # starts its thread pool for it).
                rows = logits.numpy() if logits.device.type == "cpu" else logits
                argmax = rows.argmax(-1).tolist()
            return SamplerOutput(list(argmax), [None] * len(requests))

        token_ids = [self._sample_row(logits[i], req) for i, req in enumerate(requests)]
        return SamplerOutput(token_ids, _batch_logprobs(logits, requests, token_ids))

    def _sample_row(self, row: torch.Tensor, request: Request) -> int:
        # row: (vocab,)
        params = request.sampling_params
        if params.has_penalties:
            row = apply_penalties(row, request.prompt_token_ids, request.output_token_ids, params)
        if params.greedy:
            return int(row.argmax())
        probs = truncated_probs(row, params)
        return sample_from_probs(probs, _request_generator(request, row.device))


def apply_penalties(
    row: torch.Tensor, prompt_ids: Sequence[int], output_ids: Sequence[int], params: SamplingParams
) -> torch.Tensor:
    """Returns a penalised copy of one logits row (vocab,).

    Repetition penalty (HF/CTRL): every token seen in prompt or output has a positive logit
    divided by the penalty and a negative one multiplied by it.
    Presence/frequency (OpenAI): logit -= presence * [count > 0] + frequency * count, with count
    over output tokens only.
    """
    row = row.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=row.device)
        values = row[seen]
        row[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids) > 0:
        out = torch.tensor(list(output_ids), dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    return row


def truncated_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities (vocab,) after temperature, top-k, top-p and min-p; removed tokens get 0.

    Each filter keeps at least the most likely token, so the result is never all zero.
    """
    logits = row / params.temperature
    if params.top_k and params.top_k < logits.shape[0]:
        kth_value = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    if params.min_p > 0.0:
        # min-p keeps tokens whose probability is at least min_p times the best one's.
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


# Top-p usually keeps far fewer tokens than this; looking at the best candidates first avoids a
# full-vocabulary sort, which costs tens of milliseconds per row on a CPU.
_TOP_P_CANDIDATES = 1024


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    vocab = probs.shape[0]
    k = min(vocab, _TOP_P_CANDIDATES)
    while True:
        top_probs, top_ids = torch.topk(probs, k)  # (k,), best first
        if k == vocab or float(top_probs.sum()) >= top_p:
            break
        k = vocab  # the candidates do not reach top_p: rank the whole vocabulary
    # Mass strictly before each token: a token is kept while that mass is still below top_p,
    # which always keeps the first token.
    mass_before = torch.cumsum(top_probs, dim=-1) - top_probs
    keep = top_ids[mass_before < top_p]
    return torch.zeros_like(probs).index_copy_(0, keep, probs[keep])


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from probs (vocab,) by inverting its CDF with one uniform number.

    One uniform per draw keeps a seeded generator's stream independent of the distribution, and
    is much cheaper than torch.multinomial on a CPU. A token with probability 0 is never drawn:
    searchsorted(right=True) returns the first index whose CDF exceeds u, and the CDF does not
    grow at such a token.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = _uniform(generator, probs.device) * cdf[-1]
    token_id = int(torch.searchsorted(cdf, u, right=True))
    if token_id >= probs.shape[0]:  # u rounded up to the total mass
        token_id = int(probs.nonzero()[-1])
    return token_id


def _request_generator(request: Request, device: torch.device) -> torch.Generator | None:
    """A seeded request draws from its own generator, so its samples do not depend on what else
    is in the batch. The generator lives on the request (created on first use).

    Every sampled token takes exactly one draw (see sample_from_probs), so a generator created
    for a request that already has output tokens, sampled in another process (the prefill
    worker's first token), skips one draw per token: the stream then continues exactly where
    a single engine's would, and seeded output does not depend on where each token was sampled.
    """
    seed = request.sampling_params.seed
    if seed is None:
        return None
    generator = getattr(request, "generator", None)
    if generator is None or generator.device != device:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        for _ in range(len(request.output_token_ids)):
            _uniform(generator, device)
        setattr(request, "generator", generator)
    return generator


def _uniform(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The one draw a sampled token takes: (1,) float64 in [0, 1)."""
    return torch.rand(1, generator=generator, device=device, dtype=torch.float64)


def _batch_logprobs(
    logits: torch.Tensor, requests: Sequence[Request], token_ids: list[int]
) -> list[dict[int, float] | None]:
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    result: list[dict[int, float] | None] = [None] * len(requests)
    if not rows:
        return result
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # (len(rows), vocab)
    max_n = max(requests[i].sampling_params.logprobs for i in rows)
    top_values, top_ids = torch.topk(logprobs, max_n, dim=-1) if max_n else (None, None)
    for j, i in enumerate(rows):
        chosen = token_ids[i]
        entry = {chosen: float(logprobs[j, chosen])}
        n = requests[i].sampling_params.logprobs
        if n:
            for token_id, value in zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist()):
                entry.setdefault(token_id, value)
        result[i] = entry
    return result

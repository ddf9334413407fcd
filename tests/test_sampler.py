"""Sampler: greedy, seeded sampling, truncation filters, penalties and logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler, apply_penalties, sample_from_probs, truncated_probs
from engine.sampling_params import SamplingParams

VOCAB = 32


def _request(params: SamplingParams, prompt=(1, 2, 3), output=(), request_id="r") -> Request:
    req = Request(request_id, list(prompt), params)
    for token_id in output:
        req.append_output_token(token_id)
    return req


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_for_a_batch():
    logits = _logits(5)
    out = Sampler()(logits, [_request(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.zeros(1, VOCAB)
    logits[0, [7, 3, 20]] = 5.0
    assert Sampler()(logits, [_request(SamplingParams(temperature=0.0))]).token_ids == [3]


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = _logits(4, seed=1)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=3), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=2)]
    out = Sampler()(logits, [_request(p) for p in params])
    for i in (0, 2, 3):
        assert out.token_ids[i] == int(logits[i].argmax())


def test_seeded_request_is_reproducible_alone_and_in_a_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.zeros(1, VOCAB)  # uniform: every draw depends on the generator only
    sampler = Sampler()
    alone = _request(params)
    alone_tokens = [sampler(logits, [alone]).token_ids[0] for _ in range(20)]

    batched = _request(params)
    batch_tokens = []
    for step in range(20):
        others = [_request(SamplingParams(temperature=1.0), request_id=f"o{k}") for k in range(3)]
        batch_logits = torch.cat([_logits(3, seed=step), logits])
        batch_tokens.append(sampler(batch_logits, [*others, batched]).token_ids[3])
    assert alone_tokens == batch_tokens
    assert len(set(alone_tokens)) > 3  # it really samples
    assert isinstance(getattr(alone, "generator"), torch.Generator)

    other_seed = _request(SamplingParams(temperature=1.0, seed=99))
    assert [sampler(logits, [other_seed]).token_ids[0] for _ in range(20)] != alone_tokens


def test_seeded_stream_continues_across_a_hand_off():
    """The prefill worker samples the first token; the decode worker builds its own request
    holding that token and samples the rest. The tokens equal one request sampling them all."""
    params = SamplingParams(temperature=1.0, seed=77)
    logits = torch.zeros(1, VOCAB)  # uniform: every draw depends on the generator only
    whole = _request(params)
    expected = []
    for _ in range(12):
        expected.append(Sampler()(logits, [whole]).token_ids[0])
        whole.append_output_token(expected[-1])

    prefill_side = _request(params)
    first = Sampler()(logits, [prefill_side]).token_ids[0]
    decode_side = _request(params, output=[first])  # a fresh request: no generator yet
    rest = []
    for _ in range(11):
        rest.append(Sampler()(logits, [decode_side]).token_ids[0])
        decode_side.append_output_token(rest[-1])
    assert [first, *rest] == expected
    assert len(set(expected)) > 3  # it really samples


def test_top_k_one_is_greedy():
    logits = _logits(6, seed=2)
    reqs = [_request(SamplingParams(temperature=1.5, top_k=1, seed=i)) for i in range(6)]
    assert Sampler()(logits, reqs).token_ids == logits.argmax(dim=-1).tolist()


def _draw(params: SamplingParams, logits_row: torch.Tensor, n: int) -> torch.Tensor:
    req = _request(params)
    sampler = Sampler()
    tokens = [sampler(logits_row[None], [req]).token_ids[0] for _ in range(n)]
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[0])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    counts = _draw(SamplingParams(top_p=0.75, seed=0), probs.log(), 2000)
    # 0.5 < 0.75 so token 1 is needed; 0.5 + 0.3 >= 0.75 so tokens 2 and 3 are cut.
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05
    exact = truncated_probs(probs.log(), SamplingParams(top_p=0.75))
    torch.testing.assert_close(exact, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_top_p_always_keeps_the_best_token():
    probs = torch.tensor([0.9, 0.05, 0.05])
    exact = truncated_probs(probs.log(), SamplingParams(top_p=0.01))
    torch.testing.assert_close(exact, torch.tensor([1.0, 0.0, 0.0]))


def _top_p_by_full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(probs, descending=True)
    kept = (torch.cumsum(ordered, 0) - ordered) < top_p
    out = torch.zeros_like(probs)
    out[order[kept]] = probs[order[kept]]
    return out / out.sum()


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # flat (needs > 1024 tokens) to peaked
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_equals_a_full_sort_reference(scale, top_p):
    row = torch.randn(5000, generator=torch.Generator().manual_seed(11)) * scale
    got = truncated_probs(row, SamplingParams(top_p=top_p))
    torch.testing.assert_close(got, _top_p_by_full_sort(torch.softmax(row, 0), top_p))
    if scale == 0.05 and top_p == 0.9:
        assert int((got > 0).sum()) > 1024  # the path that ranks the whole vocabulary ran


def test_sample_from_probs_follows_the_distribution_and_skips_zeros():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_from_probs(probs, generator) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert abs(counts[1] / 4000 - 0.5) < 0.03 and abs(counts[3] / 4000 - 0.25) < 0.03
    one_hot = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert {sample_from_probs(one_hot, generator) for _ in range(50)} == {5}


def test_min_p_cuts_tokens_below_the_scaled_max():
    probs = torch.tensor([0.4, 0.3, 0.19, 0.11])
    counts = _draw(SamplingParams(min_p=0.5, seed=1), probs.log(), 2000)
    assert counts[2] == 0 and counts[3] == 0  # below 0.5 * 0.4 = 0.2
    assert counts[0] > 0 and counts[1] > 0
    assert abs(counts[0] / 2000 - 0.4 / 0.7) < 0.05


def test_top_k_and_temperature():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    exact = truncated_probs(logits, SamplingParams(top_k=2, temperature=0.5))
    expected = torch.softmax(torch.tensor([6.0, 4.0]), dim=-1)
    torch.testing.assert_close(exact, torch.cat([expected, torch.zeros(2)]))


def test_repetition_penalty_by_hand():
    row = torch.tensor([2.0, -2.0, 1.0, -1.0, 4.0])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(row, prompt_ids=[0, 1], output_ids=[3, 3], params=params)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, -2.0, 4.0]))
    torch.testing.assert_close(row, torch.tensor([2.0, -2.0, 1.0, -1.0, 4.0]))  # input untouched


def test_presence_and_frequency_penalties_by_hand():
    row = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # Prompt tokens are not penalised by the OpenAI penalties.
    out = apply_penalties(row, prompt_ids=[4, 4, 4], output_ids=[1, 1, 1, 2], params=params)
    torch.testing.assert_close(out, torch.tensor([0.0, -1.25, -0.75, 0.0, 0.0]))


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    req = _request(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt=[2], output=[0])
    assert Sampler()(logits, [req]).token_ids == [1]


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.3)
    logits = _logits(1, seed=5)
    seen = [1, 5, 5, 9, 30, 2]
    expected = processor(torch.tensor([seen]), logits.clone())[0]
    got = apply_penalties(logits[0], seen[:3], seen[3:], SamplingParams(repetition_penalty=1.3))
    torch.testing.assert_close(got, expected)


def test_logprobs_chosen_plus_top_n_in_order():
    logits = _logits(2, seed=7)
    reqs = [_request(SamplingParams(temperature=0.0, logprobs=5)),
            _request(SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=1.5))]
    out = Sampler()(logits, reqs)
    raw = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert list(first)[0] == out.token_ids[0]
    top = list(first.items())
    assert len(top) == 5  # the greedy choice is also the best, so it is not listed twice
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert [k for k, _ in top] == torch.topk(raw[0], 5).indices.tolist()
    for token_id, value in top:
        assert math.isclose(value, float(raw[0, token_id]), rel_tol=1e-6)
    # logprobs=0: only the chosen token, taken from the raw (unpenalised) distribution.
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    assert math.isclose(out.logprobs[1][out.token_ids[1]], float(raw[1, out.token_ids[1]]), rel_tol=1e-6)
    # Probabilities of distinct tokens: together at most 1, and the top 5 of 32 hold most of it.
    mass = sum(math.exp(v) for v in first.values())
    assert float(torch.topk(raw[0].exp(), 5).values.sum()) == pytest.approx(mass, rel=1e-5)
    assert 0.5 < mass <= 1.0 + 1e-6


def test_logprobs_of_a_sampled_token_outside_the_top_n():
    logits = torch.tensor([[10.0, 9.0, 0.0, 0.0]])
    logits[0, 3] = 8.0
    req = _request(SamplingParams(temperature=1.0, top_k=1, logprobs=1))
    out = Sampler()(logits, [req])
    assert out.token_ids == [0]
    req2 = _request(SamplingParams(temperature=100.0, logprobs=1, seed=0))
    draws = [Sampler()(logits, [req2]) for _ in range(50)]
    outside = [d for d in draws if d.token_ids[0] != 0]
    assert outside, "at a very high temperature some draw must leave the top token"
    for d in outside:
        assert list(d.logprobs[0]) == [d.token_ids[0], 0]


def test_wrong_logits_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(2, VOCAB), [_request(SamplingParams())])

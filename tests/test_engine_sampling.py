"""Seeded sampling, stop conditions and length limits through the whole engine."""
from __future__ import annotations

import pytest

from engine import SamplingParams
from tests.conftest import assert_no_leaked_blocks

PROMPT = "Tell me a short story about a robot who learns to paint."


def test_seeded_sampling_is_reproducible(demo_llm):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                            ignore_eos=True)
    first = demo_llm.generate([PROMPT], params)[0]
    assert len(first.token_ids) == 24
    # Same seed inside a batch with other, unseeded requests: same tokens.
    others = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    batch = demo_llm.generate([PROMPT, "Hello there", PROMPT], [params, others, params])
    assert batch[0].token_ids == first.token_ids
    assert batch[2].token_ids == first.token_ids
    different = demo_llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95,
                                                           top_k=50, seed=4321, ignore_eos=True))[0]
    assert different.token_ids != first.token_ids
    assert_no_leaked_blocks(demo_llm)


def test_max_tokens_ends_with_length(demo_llm):
    out = demo_llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"


def test_stop_token_id_ends_with_stop(demo_llm):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reference = demo_llm.generate([PROMPT], greedy)[0].token_ids
    stop_id = reference[6]
    first = reference.index(stop_id)
    out = demo_llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                     stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_id
    assert out.token_ids == reference[: first + 1]


def test_stop_string_cuts_text_and_ends_with_stop(demo_llm):
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full_text = demo_llm.generate([PROMPT], greedy)[0].text
    stop = full_text[10:16]
    assert stop.strip(), full_text
    out = demo_llm.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                     stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == full_text[: full_text.index(stop)]
    assert len(out.token_ids) < 40
    assert_no_leaked_blocks(demo_llm)


def test_eos_ends_with_stop(demo_llm):
    chat = demo_llm.chat_prompt([{"role": "user", "content": "Say hi."}])
    out = demo_llm.generate([chat], SamplingParams(max_tokens=200, temperature=0.0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in demo_llm.tokenizer.eos_token_ids


def test_prompt_longer_than_max_model_len_is_refused(demo_gguf_path):
    from engine import LLM

    llm = LLM(demo_gguf_path, dtype="float32", device="cpu", max_model_len=32)
    with pytest.raises(ValueError, match="more than max_model_len"):
        llm.generate([list(range(100, 140))], SamplingParams(max_tokens=4))
    assert_no_leaked_blocks(llm)


def test_streaming_deltas_add_up_and_early_close_frees_blocks(demo_llm):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    final = demo_llm.generate([PROMPT], params)[0]
    pieces = list(demo_llm.stream(PROMPT, params))
    assert "".join(p.new_text for p in pieces) == final.text
    assert pieces[-1].finished and pieces[-1].token_ids == final.token_ids
    stream = demo_llm.stream(PROMPT, params)
    next(stream)
    stream.close()
    assert_no_leaked_blocks(demo_llm)


def test_unknown_engine_option_is_an_error(demo_gguf_path):
    from engine import LLM

    with pytest.raises(TypeError, match="unknown engine option 'block_sise'"):
        LLM(demo_gguf_path, block_sise=32)


def test_a_resumed_request_continues_exactly_where_the_first_engine_left_off(tiny_checkpoints):
    """A request resumed on a second engine with the outputs it already had (its first engine
    died) emits only the rest, greedy and seeded alike, with penalties seeing those outputs."""
    from engine import LLM

    llm = LLM(tiny_checkpoints["llama3"], dtype="float32", device="cpu", num_blocks=64, block_size=4)
    prompt = [5, 17, 33, 8, 91, 4, 12]
    for params in (SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2),
                   SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True,
                                  frequency_penalty=0.5)):
        whole = llm.generate([prompt], params)[0]
        engine = llm.engine
        engine.add_request(prompt, params, "resumed", output_token_ids=whole.token_ids[:8])
        rest = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                rest += out.new_token_ids
                final = out
        assert rest == whole.token_ids[8:]
        assert final.token_ids == whole.token_ids and final.finish_reason == "length"
        if params.logprobs is not None:  # one entry per output token; the resumed ones are empty
            assert len(final.logprobs) == 20 and final.logprobs[:8] == [{}] * 8
            for got, want in zip(final.logprobs[8:], whole.logprobs[8:]):  # recomputed: float noise
                assert got.keys() == want.keys()
                assert all(abs(got[t] - want[t]) < 1e-4 for t in got)

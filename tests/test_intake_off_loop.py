"""Tokenizing a long prompt does not hold up the event loop that serves every other stream: the
front doors admit through Intake.admit_async, which tokenizes long texts in a worker thread."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.sampling_params import SamplingParams
from router.intake import OFF_LOOP_CHARS, GenerateInput, Intake, InvalidArgument


class SlowTokenizer:
    """A tokenizer that takes 0.4 s for any text (as a fast tokenizer does for about 400 KB)."""

    vocab_size = 1000

    def __init__(self) -> None:
        self.threads: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        time.sleep(0.4)
        return [1] * max(1, len(text) // 4)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))


class Backend:
    max_model_len = 1 << 20

    def model_names(self) -> list[str]:
        return ["m"]


def checked(prompt: str | None = None, messages=None) -> GenerateInput:
    return GenerateInput("", "", SamplingParams(max_tokens=4), True, prompt=prompt, messages=messages)


async def ticks_during(awaitable) -> tuple[object, int]:
    """What `awaitable` returns, and how many 10 ms ticks the loop ran meanwhile."""
    ticks, done = 0, asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.01)
            ticks += 1
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        return await awaitable, ticks
    finally:
        done.set()
        await task


@pytest.mark.parametrize("request_", [checked(prompt="x" * OFF_LOOP_CHARS),
                                      checked(messages=(("user", "y" * (OFF_LOOP_CHARS // 2)),
                                                        ("user", "z" * (OFF_LOOP_CHARS // 2))))])
def test_a_long_text_is_tokenized_off_the_loop(request_) -> None:
    tokenizer = SlowTokenizer()
    intake = Intake(Backend(), tokenizer)

    async def scenario():
        admitted, ticks = await ticks_during(intake.admit_async(request_))
        assert admitted.prompt_token_ids and admitted.params.max_tokens == 4
        assert tokenizer.threads[-1] != threading.get_ident()
        assert ticks >= 10  # the loop kept running through the 0.4 s of tokenizing
    asyncio.run(scenario())


def test_a_short_text_is_tokenized_inline_and_errors_come_through_either_way() -> None:
    tokenizer = SlowTokenizer()
    intake = Intake(Backend(), tokenizer)

    async def scenario():
        _, ticks = await ticks_during(intake.admit_async(checked(prompt="hello")))
        assert tokenizer.threads == [threading.get_ident()] and ticks <= 1
        small = Intake(type("Small", (Backend,), {"max_model_len": 64})(), tokenizer)
        for text in ("x" * 400, "x" * OFF_LOOP_CHARS):  # inline, and from the thread
            with pytest.raises(InvalidArgument, match="the model's context is 64 tokens"):
                await small.admit_async(checked(prompt=text))
    asyncio.run(scenario())


def test_the_engine_tokenizer_lets_the_loop_run_while_it_encodes_a_long_text(demo_gguf_path) -> None:
    """The real tokenizer (a Rust `tokenizers.Tokenizer`): the same ids as its plain encode,
    and a loop that keeps ticking while a thread encodes a text of a few hundred KB."""
    from router.serve import load_tokenizer

    tokenizer = load_tokenizer(demo_gguf_path)
    text = "".join(f"word{i} and {i * 7} more; " for i in range(15000))
    plain = tokenizer.backend.encode(text).ids
    if tokenizer.add_bos_token and tokenizer.bos_token_id is not None and not tokenizer._post_processor_adds_tokens:
        plain = [tokenizer.bos_token_id] + plain
    intake = Intake(Backend(), tokenizer)

    async def scenario():
        began = time.perf_counter()
        admitted, ticks = await ticks_during(intake.admit_async(checked(prompt=text)))
        return admitted, ticks, time.perf_counter() - began
    admitted, ticks, took = asyncio.run(scenario())
    assert admitted.prompt_token_ids == plain
    assert ticks >= 0.5 * took / 0.01 - 2, (ticks, took)  # most of the 10 ms ticks it would get idle

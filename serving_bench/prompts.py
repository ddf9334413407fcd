"""Prompt text of a chosen length: in the model's own tokens when its tokenizer is at hand (so
the length is exact), else in random words (about one token each on most vocabularies)."""
from __future__ import annotations

import random
import re
from typing import Protocol

# Whole words with their leading space: a run of them re-encodes to the same tokens on
# byte-level BPE vocabularies, because the pre-tokenizer splits before every space.
_WORD_TOKEN = re.compile(r"^ [A-Za-z]{1,16}$")
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "ju", "pe", "zo")


class PromptMaker(Protocol):
    unit: str  # what `length` counts: "tokens" or "words"

    def text(self, rng: random.Random, length: int) -> str: ...

    def length(self, text: str) -> int: ...


class TokenPrompts:
    """Text of exactly `length` tokens of `tokenizer` (an engine.tokenizer.Tokenizer), BOS and
    other special tokens not counted."""

    unit = "tokens"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.word_ids = self._word_token_ids()

    def _word_token_ids(self) -> list[int]:
        special = self.tokenizer.special_token_ids
        pieces = self.tokenizer.backend.decode_batch([[i] for i in range(self.tokenizer.vocab_size)])
        ids = [i for i, piece in enumerate(pieces) if i not in special and _WORD_TOKEN.match(piece)
               and self.tokenizer.encode(piece, add_special_tokens=False) == [i]]
        if len(ids) >= 20:
            return ids
        # A small vocabulary: any printable piece; the length is made exact by re-encoding.
        return [i for i, piece in enumerate(pieces) if i not in special and piece.isprintable() and piece.strip()]

    def length(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, rng: random.Random, length: int) -> str:
        ids = [rng.choice(self.word_ids) for _ in range(length)]
        text = self.tokenizer.decode(ids)
        # Re-encoding can merge across words on some vocabularies: trim or top up until exact.
        for _ in range(16):
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == length:
                return text
            if len(encoded) > length:
                encoded = encoded[:length]
            else:
                encoded += [rng.choice(self.word_ids) for _ in range(length - len(encoded))]
            text = self.tokenizer.decode(encoded)
        raise ValueError(f"could not build a prompt of exactly {length} tokens")


class WordPrompts:
    """Random made-up words, `length` of them; the server's usage gives the token count."""

    unit = "words"

    def length(self, text: str) -> int:
        return len(text.split())

    def text(self, rng: random.Random, length: int) -> str:
        return "".join(" " + "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
                       for _ in range(length))


def prompt_maker(tokenizer: str | None) -> PromptMaker:
    """`tokenizer`: None (random words), 'demo', an HF model directory or a .gguf file."""
    if tokenizer is None:
        return WordPrompts()
    from router.serve import load_tokenizer

    return TokenPrompts(load_tokenizer(tokenizer))

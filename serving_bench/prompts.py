"""Prompt text of a chosen length: in the model's own tokens when its tokenizer is at hand (so
the length is exact), else in common English words (one token each in most large vocabularies;
the server's usage gives the exact count)."""
from __future__ import annotations

import random
import re
from typing import Protocol

# Whole words with their leading space: a run of them re-encodes to the same tokens on
# byte-level BPE vocabularies, because the pre-tokenizer splits before every space.
_WORD_TOKEN = re.compile(r"^ [A-Za-z]{1,16}$")
_COMMON_WORDS = tuple("""
the of and to in is was for on that with as by at from his her they which this are have be not
had one were all but their there been has when who will more no out up into do said them can time
only new some could these two may first then would like other its about than over such after most
made many also did well back where years through way down should because each just those people
how too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since against
go came right used take three small states himself few house use during without again place around
however home found city part earth water group light night point given large read story open road
""".split())


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
    """Common English words drawn at random, `length` of them."""

    unit = "words"

    def length(self, text: str) -> int:
        return len(text.split())

    def text(self, rng: random.Random, length: int) -> str:
        return "".join(" " + rng.choice(_COMMON_WORDS) for _ in range(length))


def prompt_maker(tokenizer: str | None) -> PromptMaker:
    """`tokenizer`: None (common English words), 'demo', an HF model directory or a .gguf file."""
    if tokenizer is None:
        return WordPrompts()
    from router.serve import load_tokenizer

    return TokenPrompts(load_tokenizer(tokenizer))

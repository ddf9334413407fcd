"""Incremental detokenization (UTF-8 safe, equal to a full decode) and stop strings."""
from __future__ import annotations

import json
import os

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer, StopMatch, StopStringMatcher
from engine.tokenizer import Tokenizer



def needs_demo(test):
    return pytest.mark.demo(test)


FIXTURE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(demo_gguf_path)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> Tokenizer:
    """A sentencepiece-style BPE (metaspace, byte fallback, leading-space strip): not byte-level,
    so the detokenizer must use its window path."""
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "café naïve"] * 10
    trained = tokenizers.Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(corpus, trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    for byte in range(256):  # byte-fallback pieces for characters the corpus never had
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = trained.normalizer
    backend.pre_tokenizer = trained.pre_tokenizer
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(backend, chat_template=None, bos_token_id=vocab["<s>"], eos_token_ids=(vocab["</s>"],),
                     add_bos_token=True)


def _stream(tokenizer: Tokenizer, ids: list[int], cuts: list[int], prompt=(), skip=True) -> list[str]:
    """Feeds ids in chunks split at the given cut points; returns every delta including flush's."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), skip_special_tokens=skip)
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    deltas = [detok.add_tokens(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


MULTIBYTE_TEXTS = ["👍🏽👨‍👩‍👧🎉", "日本語のテキスト", "naïve café ñ", "mixed 中文 and emoji 🙂 text", "🇫🇷🇩🇪"]


@needs_demo
@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_demo_one_token_at_a_time(demo_tokenizer, text):
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(demo_tokenizer, ids, list(range(len(ids))))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@needs_demo
def test_demo_emoji_really_split_across_tokens(demo_tokenizer):
    # Guards the streaming tests above: they only prove something if characters get split.
    for text in ("👍🏽👨‍👩‍👧🎉", "日本語のテキスト"):
        pieces = [demo_tokenizer.decode([i]) for i in demo_tokenizer.encode(text)]
        assert any("\ufffd" in p for p in pieces)


@needs_demo
def test_demo_special_tokens_skipped_or_kept(demo_tokenizer):
    ids = demo_tokenizer.encode("<|im_start|>assistant\nhi 🙂<|im_end|>", add_special_tokens=False)
    cuts = list(range(len(ids)))
    assert "".join(_stream(demo_tokenizer, ids, cuts, skip=True)) == "assistant\nhi 🙂"
    assert "".join(_stream(demo_tokenizer, ids, cuts, skip=False)) == "<|im_start|>assistant\nhi 🙂<|im_end|>"


@needs_demo
def test_demo_ids_past_the_vocabulary_decode_to_nothing(demo_tokenizer):
    ids = [*demo_tokenizer.encode("ok", add_special_tokens=False), demo_tokenizer.vocab_size + 3]
    assert "".join(_stream(demo_tokenizer, ids, [1])) == demo_tokenizer.decode(ids) == "ok"


@needs_demo
def test_demo_flush_releases_incomplete_bytes(demo_tokenizer):
    ids = demo_tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(demo_tokenizer, [1])
    assert detok.add_tokens(ids[:-1]) == ""  # an unfinished emoji is held back
    assert detok.flush() == "\ufffd"
    assert detok.text == "\ufffd"


@needs_demo
@FIXTURE_SETTINGS
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 60), max_size=10))
def test_demo_property_text(demo_tokenizer, text, cuts):
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(demo_tokenizer, ids, cuts)
    full = demo_tokenizer.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in d for d in deltas)


@needs_demo
@FIXTURE_SETTINGS
@given(data=st.data(), cuts=st.lists(st.integers(0, 30), max_size=8))
def test_demo_property_random_ids(demo_tokenizer, data, cuts):
    ids = data.draw(st.lists(st.integers(0, demo_tokenizer.vocab_size - 1), max_size=25))
    for skip in (True, False):
        deltas = _stream(demo_tokenizer, ids, cuts, skip=skip)
        full = demo_tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("text", ["hello world there", "the café", "emoji 🙂 and 日本 bytes", "x"])
def test_window_path_matches_full_decode(sentencepiece_tokenizer, text):
    tok = sentencepiece_tokenizer
    assert tok.byte_level_token_bytes is None
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, list(range(len(ids))))
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_window_path_keeps_space_after_prompt(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["\u2581hello", "\u2581wor"]
    # Decoded alone, "▁world" loses its leading space; after the prompt it must keep it.
    assert tok.decode(ids[1:]) == "world"
    assert "".join(_stream(tok, ids[1:], [], prompt=ids[:1])) == " world"


@FIXTURE_SETTINGS
@given(text=st.text(alphabet="helo wrdcaf\u00e9\u00ef\U0001F642\u65e5", max_size=30),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_window_path_property(sentencepiece_tokenizer, text, cuts):
    tok = sentencepiece_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, cuts)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


# --- stop strings ---------------------------------------------------------------------------
def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The stop whose first occurrence completes earliest (ties: starts earliest)."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stops if text[:end].endswith(s)]
        if ending_here:
            stop = max(ending_here, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def _run_matcher(stops, include, deltas) -> tuple[str, StopMatch | None, list[str]]:
    matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
    emitted, last = [], None
    for delta in deltas:
        last = matcher.feed(delta)
        emitted.append(last.text)
        if last.stopped:
            break
    emitted.append(matcher.flush())
    return "".join(emitted), last, emitted


@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
    include=st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_stop_matcher_property(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, last, _ = _run_matcher(stops, include, deltas)
    expected, expected_stop = _reference_stop(text, stops, include)
    assert emitted == expected
    assert (last is not None and last.stopped and last.stop_str == expected_stop) or expected_stop is None


def test_stop_matcher_holds_back_only_possible_starts():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello S") == StopMatch("hello ", False, None)
    assert matcher.feed("T") == StopMatch("", False, None)
    assert matcher.feed("ART") == StopMatch("START", False, None)
    assert matcher.feed("..ST") == StopMatch("..", False, None)
    assert matcher.feed("OP and more") == StopMatch("", True, "STOP")
    assert matcher.feed("ignored") == StopMatch("", True, "STOP")
    assert matcher.flush() == ""


def test_stop_matcher_include_stop_and_flush():
    matcher = StopStringMatcher(["</end>"], include_stop_str_in_output=True)
    assert matcher.feed("x</en") == StopMatch("x", False, None)
    assert matcher.feed("d>y") == StopMatch("</end>", True, "</end>")
    other = StopStringMatcher(["</end>"])
    assert other.feed("tail</e").text == "tail"
    assert other.flush() == "</e"


def test_stop_matcher_without_stops_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == StopMatch("anything", False, None)
    with pytest.raises(ValueError):
        StopStringMatcher([""])

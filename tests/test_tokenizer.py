"""Tokenizer: ids and chat prompts equal HF transformers' for the demo GGUF, an HF dir, and a
small GGUF written here."""
from __future__ import annotations

import json
import os

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.tokenizer import ChatTemplateError, Tokenizer, byte_level_alphabet



def needs_demo(test):
    return pytest.mark.demo(test)


TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading spaces and   runs   of spaces  ",
    "tabs\tand\nnewlines\n\n\r\nmixed",
    "héllo wörld, ñandú, Ærøskøbing",
    "日本語のテキストと中文和한국어",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷 party🎉",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b <|im_end|>",
    "1234567890 3.14159 -42 1e-9",
    "\u200bzero\ufeffwidth\u00a0nbsp",
    "Don't you'll we've I'm",
    "x" * 300,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in 日本語? 🤔"},
    ],
    [
        {"role": "user", "content": "  spaced\n\ncontent  "},
        {"role": "assistant", "content": "ok <|im_end|> inside"},
    ],
]


@pytest.fixture(scope="module")
def demo_tokenizer(demo_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(demo_gguf_path)


@pytest.fixture(scope="module")
def hf_demo_tokenizer(demo_gguf_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(demo_gguf_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _hf_chat_ids(hf, messages, add_generation_prompt=True) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@needs_demo
@pytest.mark.parametrize("text", TEXTS)
def test_demo_encode_decode_matches_hf(demo_tokenizer, hf_demo_tokenizer, text):
    ids = demo_tokenizer.encode(text)
    assert ids == hf_demo_tokenizer.encode(text)
    assert demo_tokenizer.encode(text, add_special_tokens=False) == hf_demo_tokenizer.encode(
        text, add_special_tokens=False
    )
    for skip in (True, False):
        assert demo_tokenizer.decode(ids, skip_special_tokens=skip) == hf_demo_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert demo_tokenizer.convert_ids_to_tokens(ids) == hf_demo_tokenizer.convert_ids_to_tokens(ids)


@needs_demo
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_demo_chat_template_matches_hf(demo_tokenizer, hf_demo_tokenizer, messages, add_generation_prompt):
    ours = demo_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == _hf_chat_ids(hf_demo_tokenizer, messages, add_generation_prompt)
    rendered = demo_tokenizer.render_chat_template(messages, add_generation_prompt)
    assert rendered.endswith("<|im_start|>assistant\n") == add_generation_prompt


@needs_demo
def test_demo_metadata(demo_tokenizer, hf_demo_tokenizer):
    assert demo_tokenizer.vocab_size == len(hf_demo_tokenizer) == 49152
    assert demo_tokenizer.bos_token_id == hf_demo_tokenizer.bos_token_id
    assert hf_demo_tokenizer.eos_token_id in demo_tokenizer.eos_token_ids
    assert demo_tokenizer.convert_ids_to_tokens(demo_tokenizer.eos_token_ids) == ["<|im_end|>"]
    # The special tokens stay whole when they appear in text.
    assert demo_tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]


@needs_demo
def test_from_hf_dir_matches_hf(demo_tokenizer, hf_demo_tokenizer, tmp_path):
    hf_demo_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    assert tok.vocab_size == demo_tokenizer.vocab_size
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (2, 0)  # tokenizer_config's eos first, then generation_config's
    for text in TEXTS:
        assert tok.encode(text) == hf_demo_tokenizer.encode(text)
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == _hf_chat_ids(hf_demo_tokenizer, messages)


# --- self-contained tokenizers (no demo model) -------------------------------------------
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def main():\n    print('hello world')\n",
    "日本語 テキスト emoji 🙂 naïve café",
] * 20


def _train_byte_level_bpe() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def _write_gguf(path, backend: tokenizers.Tokenizer, chat_template: str | None) -> None:
    gguf = pytest.importorskip("gguf")
    state = json.loads(backend.to_str())
    vocab = state["model"]["vocab"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    specials = {"<|endoftext|>", "<s>", "</s>"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    backend = _train_byte_level_bpe()
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    _write_gguf(path, backend, template)
    return backend, Tokenizer.from_gguf(str(path))


@pytest.mark.parametrize("text", TEXTS)
def test_small_gguf_matches_its_source_tokenizer(small_gguf, text):
    backend, tok = small_gguf
    expected = backend.encode(text).ids
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok.encode(text) == [tok.bos_token_id, *expected]  # add_bos_token is set in the file
    assert tok.decode(expected) == backend.decode(expected)


def test_small_gguf_chat_template(small_gguf):
    _, tok = small_gguf
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    rendered = tok.render_chat_template(messages)
    assert rendered == "<s>[user] hello</s>\n[assistant] world</s>\n[assistant] "
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1  # not added a second time
    with pytest.raises(ChatTemplateError, match="bad role system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_sandbox_refuses_unsafe_template(small_gguf):
    _, base = small_gguf
    tok = Tokenizer(
        base.backend, chat_template="{{ messages.__class__.__mro__ }}", bos_token_id=None,
        eos_token_ids=(), add_bos_token=False,
    )
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_chat_template_is_a_clear_error():
    backend = _train_byte_level_bpe()
    tok = Tokenizer(backend, chat_template=None, bos_token_id=None, eos_token_ids=(), add_bos_token=False)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_unsupported_gguf_tokenizer_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(str(path), "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'t5' is not supported"):
        Tokenizer.from_gguf(str(path))


def test_from_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(str(tmp_path))


def test_byte_level_alphabet_is_a_bijection():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == list(range(256))
    assert len(set(alphabet.values())) == 256
    assert set(alphabet.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "\u0120"


@pytest.fixture(scope="module")
def sentencepiece_gguf_dir(tmp_path_factory):
    """A llama-type (sentencepiece BPE) GGUF: scores instead of merges, byte tokens <0xXX>."""
    gguf = pytest.importorskip("gguf")
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trained.to_str())["model"]["vocab"]
    pieces = [t for t, _ in sorted(learned.items(), key=lambda item: item[1]) if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    directory = tmp_path_factory.mktemp("sp")
    writer = gguf.GGUFWriter(str(directory / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    # Later-learned pieces score lower, as in a sentencepiece model.
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return directory


def test_sentencepiece_gguf_matches_hf(sentencepiece_gguf_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(sentencepiece_gguf_dir), gguf_file="sp.gguf")
    tok = Tokenizer.from_gguf(str(sentencepiece_gguf_dir / "sp.gguf"))
    assert tok.add_bos_token and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.byte_level_token_bytes is None
    for text in [*TEXTS, "<s>x</s>", "  two  spaces", "the quick brown fox"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text

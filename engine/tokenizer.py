"""Text <-> token ids for one model, and its chat template.

A thin layer over a `tokenizers.Tokenizer` (the Rust backend) that adds what serving needs and the
backend does not carry: the BOS policy, the set of EOS ids that end generation, and the jinja2 chat
template. It is built either from an HF model directory (tokenizer.json + tokenizer_config.json) or
from the metadata of a GGUF file, and in both cases must produce the same ids as HF transformers.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Texts at least this long are encoded without holding the GIL, so that a server's event loop goes
# on while another thread tokenizes a long prompt (router.intake.Intake.admit_async).
_GIL_FREE_CHARS = 4096

# GGUF token types (llama.cpp's llama_token_type).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6

# Split regexes for GGUF byte-level vocabularies whose `tokenizer.ggml.pre` says the merges were
# learned on a split other than GPT-2's. Anything not listed uses GPT-2's split, as HF does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Printable latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and up,
    in byte order, so every vocabulary string is made of visible characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


class Tokenizer:
    """A model's tokenizer: encode/decode, BOS/EOS policy and chat template.

    Invariant: `encode(text, add_special_tokens=False)` never inserts tokens that are not in the
    text; BOS is added only by `encode(..., add_special_tokens=True)`, either by the backend's
    post-processor (when tokenizer.json has one that adds tokens) or here when `add_bos_token`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos_token: bool,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.special_tokens = dict(special_tokens or {})
        # If the post-processor adds tokens itself (e.g. Llama 3's TemplateProcessing), we must not
        # add a second BOS on top.
        self._post_processor_adds_tokens = backend.num_special_tokens_to_add(False) > 0

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        special_tokens = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(name, special_map.get(name)))
            if content is not None:
                special_tokens[name] = content
        model_config = _read_json(os.path.join(path, "config.json"))
        generation_config = _read_json(os.path.join(path, "generation_config.json"))

        bos_id = _lookup(backend, special_tokens.get("bos_token"))
        if bos_id is None:
            bos_id = model_config.get("bos_token_id")
        eos_ids = [_lookup(backend, special_tokens.get("eos_token"))]
        for cfg in (generation_config, model_config):
            value = cfg.get("eos_token_id")
            eos_ids.extend(value if isinstance(value, list) else [value])
        return cls(
            backend,
            chat_template=_hf_chat_template(path, config),
            bos_token_id=bos_id,
            eos_token_ids=_unique_ids(eos_ids),
            add_bos_token=bool(config.get("add_bos_token", False)),
            special_tokens=special_tokens,
        )

    @classmethod
    def from_gguf(cls, path: str, reader=None) -> Tokenizer:
        """`reader`: the file's gguf.GGUFReader when the caller has it open already."""
        from engine.loader.gguf_file import open_gguf  # imported here: only GGUF users pay for it

        meta = _GGUFTokenizerMetadata(reader if reader is not None else open_gguf(path))
        model_type = meta.get("tokenizer.ggml.model")
        if model_type == "gpt2":
            backend = _byte_level_bpe_backend(meta)
            add_bos_default = False
        elif model_type == "llama":
            backend = _sentencepiece_bpe_backend(meta)
            add_bos_default = True  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
        else:
            raise ValueError(
                f"{path}: GGUF tokenizer model {model_type!r} is not supported (supported: 'gpt2', 'llama')"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        special_tokens = {}
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
            token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None and 0 <= token_id < len(tokens):
                special_tokens[name] = tokens[token_id]
        # EOT/EOM end a chat turn for some models (Llama 3's <|eot_id|>), so they end generation too.
        eos_ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
        return cls(
            backend,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_unique_ids(eos_ids),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            special_tokens=special_tokens,
        )

    # --- vocabulary -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        return frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    @cached_property
    def byte_level_token_bytes(self) -> list[bytes] | None:
        """Each id's raw bytes when the decoder is plain byte-level (GPT-2 style), else None.

        With a byte-level decoder, decode(ids) is exactly the UTF-8 (lossy) decoding of the
        concatenation of these byte strings, which lets detokenization work on bytes.
        Tokens spelled outside the byte alphabet (some added tokens) stand for their own UTF-8.
        """
        if not isinstance(self.backend.decoder, decoders.ByteLevel):
            return None
        to_byte = {ch: b for b, ch in byte_level_alphabet().items()}
        table = []
        for token_id in range(self.vocab_size):
            token = self.backend.id_to_token(token_id) or ""
            if all(ch in to_byte for ch in token):
                table.append(bytes(to_byte[ch] for ch in token))
            else:
                table.append(token.encode("utf-8"))
        return table

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    # --- encode / decode --------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < _GIL_FREE_CHARS:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:  # the same ids; encode_batch lets go of the GIL while it works, encode does not
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and not self._post_processor_adds_tokens
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------
    def render_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead of messages")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        # The template writes BOS and the turn markers itself: adding special tokens again would
        # double them.
        prompt = self.render_chat_template(messages, add_generation_prompt)
        return self.encode(prompt, add_special_tokens=False)


# --- chat template ------------------------------------------------------------------
class ChatTemplateError(ValueError):
    """Raised by a template's own `raise_exception(...)`, e.g. for roles it does not support."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which templates written for HF do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    """Compile once per distinct template; HF renders with trim_blocks/lstrip_blocks on."""
    template = _TEMPLATE_CACHE.get(source)
    if template is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        template = env.from_string(source)
        _TEMPLATE_CACHE[source] = template
    return template


# --- HF directory helpers ------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _lookup(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _unique_ids(ids: Sequence[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _hf_chat_template(path: str, config: dict[str, Any]) -> str | None:
    """Newer HF saves the template to chat_template.jinja; older ones keep it in the config."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


# --- GGUF helpers --------------------------------------------------------------------
class _GGUFTokenizerMetadata:
    """Read access to a GGUF file's key/value metadata as plain Python values."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()


def _gguf_added_tokens(tokens: list[str], token_types: list[int], allowed: set[str] | None) -> tuple[list, list]:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so that
    both stay whole when they appear in text (llama.cpp matches them whole too)."""
    special, plain = [], []
    for token, token_type in zip(tokens, token_types):
        if allowed is not None and not set(token) <= allowed:
            continue  # not spellable in this vocabulary: a mislabelled entry, adding it would grow the vocab
        if token_type == _GGUF_CONTROL:
            special.append(AddedToken(token, normalized=False, special=True))
        elif token_type == _GGUF_USER_DEFINED:
            plain.append(AddedToken(token, normalized=False, special=False))
    return special, plain


def _byte_level_bpe_backend(meta: _GGUFTokenizerMetadata) -> tokenizers.Tokenizer:
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens))
    alphabet = byte_level_alphabet()
    spelled = set(alphabet.values())
    # Some converters store tokens as raw text rather than in the byte alphabet: respell those.
    vocab = {
        (tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    special, plain = _gguf_added_tokens(tokens, token_types, spelled)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    return backend


def _sentencepiece_bpe_backend(meta: _GGUFTokenizerMetadata) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 1/2, Mistral) rebuilt as a `tokenizers` BPE with byte fallback.

    GGUF stores no merges for these; a merge (a, b) exists when a, b and a+b are all in the
    vocabulary, ranked by the score of a+b (sentencepiece merges the best-scored pair first).
    """
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    token_types = list(meta.get("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    mergeable = {tok for tok, t in zip(tokens, token_types) if t in (_GGUF_NORMAL, _GGUF_USER_DEFINED)}
    ranked = []
    for token_id, token in enumerate(tokens):
        if token not in mergeable or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[token_id], vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Spaces become "\u2581"; the prefix one goes only in front of the text's first segment (not
    # after each special token), and not when the text already starts with a space.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
    )
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    special, plain = _gguf_added_tokens(tokens, token_types, None)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    return backend

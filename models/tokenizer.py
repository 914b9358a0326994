"""Tokenizers: the built-in byte tokenizer of the presets, a wrapper of a Hugging Face
checkpoint's own, and the tokenizer a GGUF file describes in its metadata.

All follow one protocol (`Tokenizer`): encode/decode, vocab_size, bos_id, eos_ids, add_bos,
max_token_bytes and apply_chat_template returning token ids. Special tokens are skipped by
decode.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Protocol

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")
# The byte tokenizer's template, written in the Jinja dialect of Hugging Face chat templates so
# that a preset saved as an HF checkpoint chats exactly as the built-in tokenizer does.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (ByteTokenizer, HFTokenizer and GGUFTokenizer
    implement it). add_bos says whether a plain prompt should start with BOS; encode adds it
    only when asked (add_bos=True), and chat templates write their own."""

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    max_token_bytes: int  # no token covers more UTF-8 bytes of text (bounds tokens from bytes)
    chat_template: str | None  # Jinja source (None: no chat template)

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]: ...

    def hf_fast(self): ...  # a transformers fast tokenizer of the same ids


def _with_bos(ids: list[int], add_bos: bool, bos_id: int | None) -> list[int]:
    if not add_bos:
        return ids
    if bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no BOS token")
    return [bos_id, *ids]


def _longest_spelling(texts: list[str]) -> int:
    """The most UTF-8 bytes of any of ``texts`` (at least 1)."""
    return max((len(t.encode("utf-8", errors="surrogatepass")) for t in texts), default=1) or 1


def _check_messages(messages: list[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise ValueError(f"chat messages are dicts with 'role' and 'content', got {m!r}")


def _no_chat_template(source: str) -> ValueError:
    return ValueError(
        f"{source} has no chat template, so chat messages cannot be turned into a prompt: pass "
        "plain text prompts (Engine.generate / Engine.stream) instead of chat messages, or use a "
        "checkpoint whose tokenizer has a chat template (an instruct/chat model)")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then the special tokens of SPECIALS (256..262).

    A model's vocabulary may be larger than the tokenizer's (the real-vocabulary presets):
    decode renders such ids as U+FFFD. eos_ids are <|eos|> and <|end|> (end of a chat turn).
    """

    def __init__(self):
        self.special_ids = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = 256 + len(SPECIALS)
        self.bos_id = self.special_ids["<|bos|>"]
        self.eos_ids = (self.special_ids["<|eos|>"], self.special_ids["<|end|>"])
        self.add_bos = True
        self.max_token_bytes = 1  # special-token names in text stay bytes

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Bytes of text; special-token names inside text stay plain bytes."""
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                pending.append(i)
                continue
            if i < self.vocab_size:  # a special token: skipped
                continue
            out.append(pending.decode("utf-8", errors="replace") + "\ufffd")
            pending.clear()
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    chat_template = BYTE_CHAT_TEMPLATE

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """[bos] (<|role|> content <|end|>)* [<|assistant|>]; roles: system, user, assistant.
        The template takes no tools (jvt.tools.inline_tools writes them into the messages)."""
        _check_messages(messages)
        if tools:
            raise ValueError("the byte tokenizer's chat template takes no tools")
        ids = [self.bos_id]
        for m in messages:
            if m["role"] not in ROLES:
                raise ValueError(f"unknown chat role {m['role']!r}; supported: {ROLES}")
            ids.append(self.special_ids[f"<|{m['role']}|>"])
            ids += self.encode(m["content"])
            ids.append(self.special_ids["<|end|>"])
        if add_generation_prompt:
            ids.append(self.special_ids["<|assistant|>"])
        return ids

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write this tokenizer as a Hugging Face fast tokenizer (byte-level BPE, no merges,
        same ids and chat template), so that HFTokenizer reads it back identically."""
        self.hf_fast().save_pretrained(os.fspath(directory))

    def hf_fast(self):
        """This tokenizer as a transformers fast tokenizer (the same ids; structured outputs'
        grammar library reads the vocabulary from it)."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens(list(SPECIALS))
        # Carries add_bos: HFTokenizer reads it off an encoding with special tokens.
        raw.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1",
            special_tokens=[("<|bos|>", self.bos_id)])
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>",
                                      eos_token="<|eos|>", pad_token="<|pad|>")
        tok.chat_template = BYTE_CHAT_TEMPLATE
        return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class HFTokenizer:
    """A checkpoint directory's own tokenizer (transformers AutoTokenizer, local files only)
    with its chat template. extra_eos adds end ids named by config.json/generation_config.json."""

    def __init__(self, directory: str | os.PathLike, extra_eos: tuple[int, ...] = ()):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
        self.vocab_size = len(self._tok)
        self.bos_id = self._tok.bos_token_id
        eos = [self._tok.eos_token_id, *extra_eos]
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        # The tokenizer's own rule (its post-processor or add_bos_token flag), read off an
        # encoding of the empty text with its special tokens.
        self.add_bos = (self.bos_id is not None and
                        self._tok.encode("", add_special_tokens=True)[:1] == [self.bos_id])

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return _with_bos(self._tok.encode(text, add_special_tokens=False), add_bos, self.bos_id)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """From every token's spelling and its decoding alone (special tokens included)."""
        ids = list(range(len(self._tok)))
        spellings = [t for t in self._tok.convert_ids_to_tokens(ids) if t is not None]
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            decoded = backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
        else:
            decoded = [self._tok.decode([i], skip_special_tokens=False) for i in ids]
        return _longest_spelling(spellings + decoded)

    @property
    def chat_template(self) -> str | None:
        return self._tok.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Render the checkpoint's chat template to text (it writes its own BOS), then encode."""
        _check_messages(messages)
        if not self._tok.chat_template:
            raise _no_chat_template(f"the tokenizer of {self._tok.name_or_path}")
        text = self._tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self._tok.encode(text, add_special_tokens=False)

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write the wrapped tokenizer's files (with its chat template) to directory."""
        self._tok.save_pretrained(os.fspath(directory))

    def hf_fast(self):
        """The wrapped transformers tokenizer."""
        return self._tok


# Split regexes of the original tokenizer.json files of the byte-level BPE vocabularies that
# GGUF files name in tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp applies the same rules).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class _PreRule(NamedTuple):
    """How a byte-level BPE vocabulary splits text, by its tokenizer.ggml.pre name."""

    split: str | None  # split regex; None: GPT-2's own (ByteLevel's built-in regex)
    digits: bool  # isolate every numeric character (\p{N}) first
    ignore_merges: bool  # a pre-token that is a whole vocabulary entry is kept whole
    add_bos: bool  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


# As llama.cpp has them: Llama 3 vocabularies ignore merges for whole words and add BOS.
_BPE_PRE = {
    "gpt-2": _PreRule(None, False, False, False),
    "smollm": _PreRule(None, True, False, False),
    "llama-bpe": _PreRule(_LLAMA3_SPLIT, False, True, True),
    "llama3": _PreRule(_LLAMA3_SPLIT, False, True, True),
    "llama-v3": _PreRule(_LLAMA3_SPLIT, False, True, True),
    "qwen2": _PreRule(_QWEN2_SPLIT, False, False, False),
    "deepseek-r1-qwen": _PreRule(_QWEN2_SPLIT, False, False, False),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)


class GGUFTokenizer:
    """The tokenizer a GGUF file describes in its metadata, built with the tokenizers library:
    byte-level BPE (tokenizer.ggml.model "gpt2") with the split rule of tokenizer.ggml.pre
    (one of _BPE_PRE), the file's control tokens as special tokens and its user-defined tokens
    matched whole, and the file's chat template (tokenizer.chat_template).

    add_bos is tokenizer.ggml.add_bos_token, else llama.cpp's default for the vocabulary.
    extra_eos adds end ids (the config's eos ids, e.g. Llama 3's <|eot_id|>).
    SentencePiece vocabularies (tokenizer.ggml.model "llama", Llama 2 / Mistral v0.1 files) are
    not supported: ValueError.
    """

    def __init__(self, path: str | os.PathLike, extra_eos: tuple[int, ...] = ()):
        from jvt.models.gguf import open_gguf

        self.path = os.fspath(path)
        meta = open_gguf(self.path).metadata
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{self.path}: the GGUF metadata has no tokenizer.ggml.tokens")
        self._tokens = tokens
        self.vocab_size = len(tokens)
        self.bos_id = self._token_id(meta, "bos")
        eos = (self._token_id(meta, "eos"), self._token_id(meta, "eot"),
               self._token_id(meta, "eom"), *extra_eos)
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        rule = self._pre_rule(meta)
        self.add_bos = (bool(meta.get("tokenizer.ggml.add_bos_token", rule.add_bos))
                        and self.bos_id is not None)
        self._raw = self._build(meta, rule)
        self._special = {name: self._token_id(meta, key) for name, key in
                         (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding"))}
        self.chat_template = meta.get("tokenizer.chat_template")

    def _token_id(self, meta: dict, name: str) -> int | None:
        token = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token is not None and not (isinstance(token, int) and 0 <= token < self.vocab_size):
            raise ValueError(f"{self.path}: tokenizer.ggml.{name}_token_id {token!r} is not an id "
                             f"of the {self.vocab_size}-token vocabulary")
        return token

    def _pre_rule(self, meta: dict) -> _PreRule:
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
        if kind != "gpt2":
            raise ValueError(f"{self.path}: GGUF tokenizer model {kind!r} is not supported; "
                             "supported: 'gpt2' (byte-level BPE)")
        if pre not in _BPE_PRE:
            raise ValueError(f"{self.path}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is "
                             f"not supported; supported: {', '.join(_BPE_PRE)}")
        return _BPE_PRE[pre]

    def _build(self, meta: dict, rule: _PreRule):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as RawTokenizer

        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        # A spelling listed twice encodes to its last id, as in llama.cpp (both ids decode).
        vocab = {token: i for i, token in enumerate(self._tokens)}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges,
                                      ignore_merges=rule.ignore_merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                              use_regex=rule.split is None)
        steps = [pre_tokenizers.Split(Regex(rule.split), behavior="isolated")] if rule.split else []
        if rule.digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        raw.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level])
        raw.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [0] * len(self._tokens)
        raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(self._tokens, types) if k == _CONTROL])
        raw.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(self._tokens, types) if k == _USER_DEFINED])
        if self.add_bos:
            # Only for save_hf: encode passes add_special_tokens=False and adds BOS itself.
            bos = self._tokens[self.bos_id]
            raw.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                special_tokens=[(bos, self.bos_id)])
        return raw

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; special tokens written in text become their single ids.
        (encode_batch releases the GIL while it works, encode does not: 0.8 s for 1 MiB.)"""
        ids = self._raw.encode_batch([text], add_special_tokens=False)[0].ids
        return _with_bos(ids, add_bos, self.bos_id)

    def decode(self, ids: list[int]) -> str:
        return self._raw.decode(list(ids), skip_special_tokens=True)

    def hf_fast(self):
        """The tokenizer built from the GGUF file as a transformers fast tokenizer."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self._raw)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """From every token's spelling and its decoding alone (special tokens included)."""
        decoded = self._raw.decode_batch([[i] for i in range(self.vocab_size)],
                                         skip_special_tokens=False)
        return _longest_spelling(self._tokens + decoded)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Render the file's chat template to text (it writes its own BOS), then encode."""
        _check_messages(messages)
        if not self.chat_template:
            raise _no_chat_template(f"the GGUF file {self.path}")
        text = self._template.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **self._special_tokens)
        return self.encode(text)

    @property
    def _special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ...: the special tokens' text, as templates see them."""
        return {k: self._tokens[i] for k, i in self._special.items() if i is not None}

    @functools.cached_property
    def _template(self):
        """The chat template compiled as transformers compiles it (a sandboxed Jinja
        environment with its options, `tojson` filter and globals), without importing
        transformers (seconds, and a warning where torch is absent)."""
        import datetime
        import json

        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write this tokenizer as a Hugging Face fast tokenizer (same ids, BOS rule and chat
        template), so that HFTokenizer reads it back identically."""
        self._hf.save_pretrained(os.fspath(directory))

    @functools.cached_property
    def _hf(self):
        """A transformers wrapper of the same tokenizer: transformers renders chat templates
        (Jinja, with its sandbox and helpers) and writes HF tokenizer files."""
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=self._raw, **self._special_tokens)
        tok.chat_template = self.chat_template
        return tok

"""Tokenizers: the built-in byte tokenizer of the presets and a wrapper of a checkpoint's own.

Both follow one protocol (`Tokenizer`): encode/decode, vocab_size, bos_id, eos_ids and
apply_chat_template returning token ids. Special tokens are skipped by decode.
"""

from __future__ import annotations

import os
from typing import Protocol

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")
# The byte tokenizer's template, written in the Jinja dialect of Hugging Face chat templates so
# that a preset saved as an HF checkpoint chats exactly as the built-in tokenizer does.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (ByteTokenizer and HFTokenizer implement it)."""

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]: ...


def _check_messages(messages: list[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise ValueError(f"chat messages are dicts with 'role' and 'content', got {m!r}")


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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        """[bos] (<|role|> content <|end|>)* [<|assistant|>]; roles: system, user, assistant."""
        _check_messages(messages)
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
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens(list(SPECIALS))
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>",
                                      eos_token="<|eos|>", pad_token="<|pad|>")
        tok.chat_template = BYTE_CHAT_TEMPLATE
        tok.save_pretrained(os.fspath(directory))


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

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        """Render the checkpoint's chat template to text (it writes its own BOS), then encode."""
        _check_messages(messages)
        if not self._tok.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template")
        text = self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self._tok.encode(text, add_special_tokens=False)

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write the wrapped tokenizer's files (with its chat template) to directory."""
        self._tok.save_pretrained(os.fspath(directory))

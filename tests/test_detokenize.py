"""IncrementalDetokenizer against the full decode of the same tokens (the reference)."""

import random

import pytest

from jvt.detokenize import IncrementalDetokenizer
from jvt.models import ByteTokenizer, HFTokenizer


def _outputs(seed: int, n: int) -> list[int]:
    """Byte tokens mixing ASCII, multi-byte UTF-8, invalid bytes and special tokens."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.4:
            out += list(rng.choice(["hello ", " world", "a", "\n", "STOP"]).encode())
        elif kind < 0.7:
            out += list(rng.choice(["é", "日本", "🙂", "ß"]).encode())
        elif kind < 0.9:
            out.append(rng.randrange(128, 256))  # a lone continuation or lead byte
        else:
            out.append(rng.randrange(256, 263))  # a special token
    return out[:n]


@pytest.fixture(scope="module", params=["byte", "hf"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte":
        return ByteTokenizer()
    directory = tmp_path_factory.mktemp("hf-byte-tokenizer")
    ByteTokenizer().save_hf(directory)
    return HFTokenizer(directory)


@pytest.mark.parametrize("seed", range(8))
def test_text_equals_full_decode_after_every_token(tokenizer, seed):
    prompt = list(b"prompt: ")
    outputs = _outputs(seed, 200)
    tokens = list(prompt)
    detok = IncrementalDetokenizer(tokenizer, len(prompt))
    text, widest = "", 0
    for t in outputs:
        tokens.append(t)
        widest = max(widest, len(tokens) - detok.prefix)
        text += detok.step(tokens)
        assert text + detok.pending == tokenizer.decode(tokens[len(prompt):])
    assert widest < 40  # each step decodes a short window, not the whole output
    text += detok.flush(tokens)
    assert text == tokenizer.decode(outputs)
    assert detok.flush(tokens) == "" and detok.pending == ""

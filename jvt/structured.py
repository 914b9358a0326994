"""Structured outputs: the constraint of a request compiled by llguidance, one matcher per
constrained sequence, and the packed allowed-token bitmask of a step.

llguidance (a Rust library, no dependencies) was chosen over xgrammar by measurement on
SmolLM2's 49152-token vocabulary (docs/engine.md): a nested JSON schema compiles in ~3.5 ms
(xgrammar ~7 ms) and masks in ~20 us per token (median; xgrammar ~2 us), and xgrammar pulls
torch and triton into the install. Grammars are cached by constraint; matchers are per
sequence and advance by the tokens the host keeps (never by discarded or refused ones).
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

from jvt.types import SamplingParams

# Whitespace between JSON tokens: what models write (newlines, indentation), at most 16
# characters per gap so that a model cannot spend its tokens on whitespace (unbounded, a small
# model can loop there; none at all, SmolLM2 writes garbage keys rather than "{" + newline). A
# schema's "x-guidance" options override this.
JSON_STYLE = {"whitespace_pattern": r"[\n\t ]{0,16}"}


@functools.lru_cache(maxsize=256)
def grammar(kind: str, spec: str) -> str:
    """The llguidance grammar of one constraint (SamplingParams.constraint); ValueError naming
    the SamplingParams field when the library refuses it."""
    try:
        if kind == "json_schema":
            text = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_STYLE)
        elif kind == "json_object":
            text = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_STYLE)
        elif kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            text = llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
        else:  # "grammar": Lark, or GBNF (llama.cpp's) when it has "::=" rules
            lark = gbnf_to_lark(spec) if "::=" in spec else spec
            text = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(text)
    except (ValueError, RuntimeError, TypeError, GbnfToLarkError) as e:
        error = str(e)
    if error:
        raise ValueError(f"SamplingParams.{kind}: the grammar library refuses it: "
                         f"{error.strip()}")
    return text


class Constrainer:
    """The engine's structured-output state: its tokenizer as llguidance sees it.

    tokenizer: the engine's tokenizer (``hf_fast()`` gives a transformers fast tokenizer);
    vocab: the model's vocabulary size (the bitmask's width; ids past the tokenizer's are
    never allowed); eos_ids: what ends a completed output.
    """

    def __init__(self, tokenizer, vocab: int, eos_ids: tuple[int, ...]):
        import llguidance.hf

        self.vocab = vocab
        self.eos_ids = frozenset(eos_ids)
        self.words = (vocab + 31) // 32
        self.lltokenizer = llguidance.hf.from_tokenizer(tokenizer.hf_fast(), n_vocab=vocab,
                                                        eos_token=list(eos_ids) or None)

    def matcher(self, params: SamplingParams) -> llguidance.LLMatcher:
        """A fresh matcher of ``params``' constraint (ValueError if it does not compile)."""
        m = llguidance.LLMatcher(self.lltokenizer, grammar(*params.constraint))
        if m.is_error():
            raise ValueError(f"SamplingParams.{params.constraint[0]}: {m.get_error()}")
        return m

    def masks(self, rows: list[tuple[int, llguidance.LLMatcher]], s: int) -> np.ndarray:
        """[s, words] int32 allowed-token bits (bit v % 32 of word v // 32); rows not listed
        allow every token."""
        out = np.full((s, self.words), -1, np.int32)
        for row, m in rows:
            llg_numpy.fill_next_token_bitmask(m, out, row)
        return out

    def take(self, m: llguidance.LLMatcher, token: int) -> bool:
        """Feed a drawn token to its sequence's matcher: whether it is allowed (and taken; a
        refused token changes nothing). A stopped matcher (its constraint complete, nothing
        may follow) allows the EOS ids only, as its mask does."""
        ok = token in self.eos_ids if m.is_stopped() else m.validate_tokens([token]) == 1
        return ok and m.consume_token(token)

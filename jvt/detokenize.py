"""Incremental detokenization: a request's output text without re-decoding all its tokens.

Decoding every output token list from the start after each new token costs O(n) per token
(O(n^2) per request), on the engine's per-step path. Instead, the text of tokens[:read] is
settled, and each new token decodes only a short window tokens[prefix:] (prefix: where the
previous settled piece started, so the tokenizer sees the context it needs for leading spaces
and merges) and appends what goes beyond the window's settled part. While the window's text
ends in U+FFFD (a character whose bytes have not all arrived), nothing is settled; flush()
adds the rest exactly as a full decode shows it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Text of tokens[start:] of a growing token list, one window decode per call.

    Args:
      tokenizer: anything with ``decode(ids) -> str``.
      start: index of the first token to detokenize (the prompt's length).
    """

    def __init__(self, tokenizer, start: int):
        self.tokenizer = tokenizer
        self.prefix = start  # start of the window: the last settled piece begins here
        self.read = start  # tokens[:read] are settled in the text returned so far
        self.pending = ""  # text of tokens[read:] as a full decode shows it now (may end in U+FFFD)

    def step(self, tokens: list[int]) -> str:
        """The text settled by the tokens appended since the last call ('' while pending)."""
        settled, window = self._decode(tokens)
        self.pending = window[len(settled):]
        if not self.pending or self.pending.endswith("\ufffd"):
            return ""
        text, self.pending = self.pending, ""
        self.prefix, self.read = self.read, len(tokens)
        return text

    def flush(self, tokens: list[int]) -> str:
        """The rest of the text, incomplete characters included (as U+FFFD)."""
        settled, window = self._decode(tokens)
        self.prefix = self.read = len(tokens)
        self.pending = ""
        return window[len(settled):]

    def _decode(self, tokens: list[int]) -> tuple[str, str]:
        return (self.tokenizer.decode(tokens[self.prefix:self.read]),
                self.tokenizer.decode(tokens[self.prefix:]))

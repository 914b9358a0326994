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


class OutputText:
    """The output text of one request as its tokens arrive: incremental detokenization, stop
    strings, and what a stream may show yet. Used by the engine, and by the server's API
    process when the engine runs in a process of its own.

    Args:
      tokenizer: anything with ``decode(ids) -> str``.
      start: the prompt's length (tokens[start:] are the output).
      stop: strings that end the output (it is trimmed before the first match).
    """

    def __init__(self, tokenizer, start: int, stop: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(tokenizer, start)
        self.stop = stop
        self.hold = max((len(s) - 1 for s in stop), default=0)  # may still become a stop
        self.text = ""  # the settled output text (trimmed at a stop string once matched)
        self.streamed = 0  # characters already handed out by take()

    def add(self, tokens: list[int], stops: bool = True) -> bool:
        """Take the token just appended to ``tokens``; True when the output now holds a stop
        string (the text is then trimmed before it and final). stops False (before
        min_tokens) looks for none."""
        before = len(self.text)
        self.text += self.detokenizer.step(tokens)
        if not stops:
            return False
        shown = self.text + self.detokenizer.pending  # the full decode of the output so far
        for stop in self.stop:
            # A match ends in what is new: text[:before] is settled and was searched (or came
            # before min_tokens); what was held back (pending) starts at ``before``.
            at = shown.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                self.text = shown[:at]
                return True
        return False

    def finish(self, tokens: list[int]) -> None:
        """The output ended for another reason than a stop string: settle the rest."""
        self.text += self.detokenizer.flush(tokens)

    def take(self, finished: bool) -> str:
        """The text since the previous take. Until ``finished``, what may still turn into a
        stop string or complete a UTF-8 character is held back."""
        shown = self.text if finished else self.text + self.detokenizer.pending
        end = len(shown)
        if not finished:
            end -= self.hold
            while end > self.streamed and shown[end - 1] == "\ufffd":
                end -= 1
        if end <= self.streamed:
            return ""
        text, self.streamed = shown[self.streamed:end], end
        return text

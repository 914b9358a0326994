"""Session: a multi-turn chat whose KV cache stays in its slot between turns.

Each turn renders the whole conversation with the tokenizer's chat template; the scheduler
gives the turn the session's retained slot and recomputes only the tokens after the longest
prefix the slot already holds. If the slot was evicted under memory pressure the turn is
recomputed (or shares a prefix) transparently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Self

from jvt.types import RequestOutput, SamplingParams, StreamDelta

if TYPE_CHECKING:
    from jvt.engine import Engine


class Session:
    """A conversation with an Engine (``engine.session()``); close it to free its slot."""

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.messages: list[dict] = []
        if system is not None:
            self.messages.append({"role": "system", "content": system})

    def _prompt(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text:
            raise ValueError(f"a session message must be a non-empty str, got {text!r}")
        messages = [*self.messages, {"role": "user", "content": text}]
        return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def send(self, text: str, sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Add a user message, generate the assistant's reply and append it; returns it."""
        ids, _, params = self.engine._check(self._prompt(text), sampling_params or
                                            SamplingParams(), "message")
        req = self.engine._add(ids, None, params, owner=self)
        out = self.engine._run([req])[0].output()
        self._record(text, out.text)
        return out

    def stream(self, text: str, sampling_params: SamplingParams | None = None
               ) -> Iterator[StreamDelta]:
        """Like send(), yielding deltas; the reply is appended when the stream ends."""
        deltas = self.engine.stream(self._prompt(text), sampling_params, _owner=self)
        return self._record_stream(text, deltas)

    def _record_stream(self, text: str, deltas: Iterator[StreamDelta]) -> Iterator[StreamDelta]:
        reply = []
        for delta in deltas:
            reply.append(delta.text)
            yield delta
        self._record(text, "".join(reply))

    def _record(self, text: str, reply: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": reply})

    def close(self) -> None:
        """Release the session's retained KV slot."""
        self.engine.scheduler.forget(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

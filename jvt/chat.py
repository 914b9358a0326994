"""The terminal chat loop shared by ``python -m jvt chat`` and ``examples/chat.py``.

Reads user messages from stdin (interactive or piped), streams each reply of a multi-turn
``Session`` (which keeps the conversation's KV between turns) and prints the turn's time to
first token and decode rate. Ctrl-D ends it; Ctrl-C aborts the reply being streamed and ends it.
"""

from __future__ import annotations

import sys
import time

from jvt.session import Session
from jvt.types import SamplingParams

# Engine options of a one-person chat: one sequence, few step shapes (each compiles, or loads
# from the compilation cache, at start-up): decode (1, 1) and prefill buckets of 16/64/256.
CHAT_ENGINE = {"max_num_seqs": 1, "max_num_batched_tokens": 256, "token_buckets": (16, 64, 256),
               "seq_buckets": (1,), "prefill_chunk": 256}


def repl(session: Session, params: SamplingParams) -> None:
    """Chat on stdin/stdout until end of input or Ctrl-C."""
    interactive = sys.stdin.isatty()
    try:
        while True:
            try:
                text = input("you> " if interactive else "")
            except EOFError:
                break
            if not text.strip():
                continue
            if not interactive:  # echo piped input so the transcript reads like a chat
                print(f"you> {text}")
            turn(session, text, params)
    except KeyboardInterrupt:
        print()


def turn(session: Session, text: str, params: SamplingParams) -> None:
    """Stream one reply, then print the number of tokens, TTFT and tokens/s of the turn."""
    print("bot> ", end="", flush=True)
    start, first, tokens = time.perf_counter(), None, 0
    for delta in session.stream(text, params):
        if delta.token_ids and first is None:
            first = time.perf_counter()
        tokens += len(delta.token_ids)
        print(delta.text, end="", flush=True)
    end = time.perf_counter()
    ttft = (first - start) * 1e3 if first else float("nan")
    rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
    print(f"\n     [{tokens} tokens, ttft {ttft:.1f} ms, {rate:.1f} tok/s]", flush=True)

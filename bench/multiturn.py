"""Multi-turn chat: KV retention (sessions) vs recomputing the conversation every turn.

C conversations of 8 turns (bench/workload.conversations), turns interleaved across
conversations (so the sessions' slots stay retained while others run). "sessions": each turn is
`session.send(message)`: the slot keeps the conversation's KV and only the new tokens are
computed. "recompute": each turn is `engine.chat(history)` on the same rendered history (the
messages the session recorded), computed from scratch (prefix sharing off). Greedy answers of a
fixed length, EOS ignored. Per turn: TTFT (from RequestMetrics) and the turn's wall time.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from bench import workload
from bench.common import Plot, Report, log


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    conversations: int
    turns: int
    turn_mean: float
    max_turn: int
    answer_len: int
    max_model_len: int
    token_buckets: tuple[int, ...] | None


# 8 turns of at most 384 + 4 template tokens plus replies re-encoded from text (a random-weight
# reply of 32 tokens renders as up to 96 bytes) stay below max_model_len 4096.
FULL = Plan("llama-3.2-1b", 4, 8, 300.0, 384, 32, 4096, (16, 1024))
SMOKE = Plan("tiny", 2, 8, 20.0, 40, 4, 512, None)


def run(report: Report, smoke: bool) -> None:
    from jvt import Engine, SamplingParams
    from jvt.models import load

    plan = SMOKE if smoke else FULL
    model = load(plan.model)
    extra = {} if plan.token_buckets is None else {
        "token_buckets": plan.token_buckets, "max_num_batched_tokens": plan.token_buckets[-1],
        "prefill_chunk": plan.token_buckets[-1], "seq_buckets": (1, plan.conversations)}
    engine = Engine(model, max_num_seqs=plan.conversations, max_model_len=plan.max_model_len,
                    device="cuda" if jax.default_backend() == "gpu" else "cpu",
                    enable_prefix_sharing=False, **extra)
    sp = SamplingParams(temperature=0.0, max_tokens=plan.answer_len, ignore_eos=True)
    convs = workload.conversations(plan.conversations, turns=plan.turns, seed=0,
                                   turn_mean=plan.turn_mean, max_turn=plan.max_turn)
    shape = (plan.turns, plan.conversations)
    ttft = {m: np.zeros(shape) for m in ("sessions", "recompute")}
    wall = {m: np.zeros(shape) for m in ("sessions", "recompute")}
    prompt_tokens = np.zeros(shape, np.int64)
    answers: dict[tuple[int, int], list[int]] = {}  # (turn, conversation) -> session's answer
    same = 0
    try:
        engine.chat([{"role": "user", "content": convs[0][0]}], sp)  # warm-up
        sessions = [engine.session() for _ in convs]
        log(f"multiturn {plan.model}: {plan.conversations} conversations x {plan.turns} turns, "
            "sessions")
        for t in range(plan.turns):
            for c, conv in enumerate(convs):
                t0 = time.perf_counter()
                out = sessions[c].send(conv[t], sp)
                wall["sessions"][t, c] = time.perf_counter() - t0
                ttft["sessions"][t, c] = out.metrics.ttft
                prompt_tokens[t, c] = len(out.prompt_token_ids)
                answers[t, c] = out.token_ids
        histories = [s.messages for s in sessions]
        for s in sessions:
            s.close()
        log("multiturn: recompute")
        for t in range(plan.turns):
            for c in range(len(convs)):
                t0 = time.perf_counter()
                out = engine.chat(histories[c][:2 * t + 1], sp)
                wall["recompute"][t, c] = time.perf_counter() - t0
                ttft["recompute"][t, c] = out.metrics.ttft
                if len(out.prompt_token_ids) != prompt_tokens[t, c]:
                    raise RuntimeError(f"turn {t} of conversation {c}: recompute prompt has "
                                       f"{len(out.prompt_token_ids)} tokens, the session's had "
                                       f"{prompt_tokens[t, c]}")
                same += out.token_ids == answers[t, c]
    finally:
        engine.close()
    table = report.table(
        f"Multi-turn chat ({plan.model}, {plan.conversations} conversations, answers of "
        f"{plan.answer_len} tokens; means over conversations)",
        ["turn", "prompt tokens", "TTFT ms sessions", "TTFT ms recompute", "turn ms sessions",
         "turn ms recompute", "speedup"])
    table.notes.append(f"greedy answers identical in both modes: {same}/{len(answers)} turns "
                       "(KV reused from decode steps vs recomputed by prefill: bf16 numerics may "
                       "flip near-ties)")
    for t in range(plan.turns):
        s, r = wall["sessions"][t].mean(), wall["recompute"][t].mean()
        table.add(t + 1, int(prompt_tokens[t].mean()), 1e3 * ttft["sessions"][t].mean(),
                  1e3 * ttft["recompute"][t].mean(), 1e3 * s, 1e3 * r, r / s)
    turns = list(range(1, plan.turns + 1))
    report.plots.append(Plot("multiturn_ttft", f"Multi-turn TTFT ({plan.model})", "turn",
                             "TTFT ms", {m: (turns, (1e3 * ttft[m].mean(axis=1)).tolist())
                                         for m in ttft}))
    report.headline_row("multi-turn", f"total ms of {plan.turns} turns", 1e3 * wall[
        "sessions"].sum(axis=0).mean(), "recompute each turn",
        1e3 * wall["recompute"].sum(axis=0).mean(), higher_is_better=False)
    report.headline_row("multi-turn", f"TTFT ms at turn {plan.turns}",
                        1e3 * ttft["sessions"][-1].mean(), "recompute each turn",
                        1e3 * ttft["recompute"][-1].mean(), higher_is_better=False)

"""The messages between the server's API process and its engine process: msgpack arrays
(msgspec), one per engine step from the engine, one per command to it. Only token ids,
sampling parameters, ids, aborts, per-step outputs and stats travel; no text.

API process -> engine process:
  ["add", sid, [[prompt_ids, params], ...]]   one submission (sid: the API's int id); params
                                              is ``params_to_wire`` of a SamplingParams
  ["abort", sid, index | None]                one choice of a submission, or all of them
  ["abort_all"]
  ["call", name, key]                         engine.<name>() for name in engine_loop.CALLS
  ["stop"]                                    abort what is left, close the engine, exit 0

Engine process -> API process:
  ["ready", config]                           EngineConfig fields (dict) once the engine runs
  ["failed", kind, message]                   the engine could not be built; kind "value" for
                                              bad options (ValueError), "error" otherwise
  ["step", accepts, records, stats, answers]  what one engine step produced:
    accepts: [sid, None] | [sid, "invalid", index, message] | [sid, "failed", message]
    records: [sid, index, token_ids, logprobs, finish_reason, error, metrics,
              prompt_logprobs] per request with new output; logprobs None or
             ``logprobs_to_wire``; metrics [scheduled_time or None (time.perf_counter, the
             same monotonic clock in both processes), prefix_tokens_reused, num_preemptions];
             prompt_logprobs None or ``prompt_logprobs_to_wire`` (on a request's first record)
    stats: engine.stats() or None (sent every engine_loop.STATS_INTERVAL_S and when idle)
    answers: [key, result, error message or None] per "call"
"""

from __future__ import annotations

import dataclasses

import msgspec

from jvt.types import Logprob, SamplingParams

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode


def params_to_wire(params: SamplingParams) -> dict:
    return dataclasses.asdict(params)


def params_from_wire(fields: dict) -> SamplingParams:
    return SamplingParams(**fields)


def logprobs_to_wire(logprobs: list[Logprob]) -> list:
    return [[lp.token_id, lp.logprob, list(lp.top.items()), lp.rank] for lp in logprobs]


def logprobs_from_wire(items: list) -> list[Logprob]:
    return [Logprob(token, logprob, dict(top), rank) for token, logprob, top, rank in items]


def prompt_logprobs_to_wire(logprobs: list[Logprob | None]) -> list:
    """The first entry is None (the first prompt token has no logprob)."""
    return [None, *logprobs_to_wire(logprobs[1:])]


def prompt_logprobs_from_wire(items: list) -> list[Logprob | None]:
    return [None, *logprobs_from_wire(items[1:])]

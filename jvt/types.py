"""Types that cross module boundaries (engine <-> runner <-> model <-> FFI op).

Every array field carries a shape comment. T is the packed token count of a step (a bucket
size), S the number of sequence entries of a step (a bucket size).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnMeta:
    """Per-step attention metadata: a packed ragged batch of decode tokens and prefill chunks.

    Sequence i owns rows [seq_start[i], seq_start[i+1]) of the step's tokens; its n_i new
    tokens take positions [seq_len[i] - n_i, seq_len[i]) in slot seq_slot[i], and each attends
    causally to positions [0, its own position]. Rows >= seq_start[S] are padding: nothing is
    written for them and their attention output is zero. Entries with an empty row range are
    ignored (their seq_slot may be -1); an entry whose seq_slot is -2 (masked: a row that
    finished inside a K-step decode call) is skipped like padding.
    """

    positions: jax.Array  # [T] int32 position of each row (RoPE); 0 for padding rows
    seq_start: jax.Array  # [S+1] int32 non-decreasing, seq_start[0] == 0, seq_start[S] <= T
    seq_slot: jax.Array  # [S] int32 KV-store slot of each sequence, -1 when unused
    seq_len: jax.Array  # [S] int32 KV length of each sequence after this step


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    temperature 0 is greedy (argmax). top_k 0 keeps the whole vocabulary; top_p 1.0 and min_p
    0.0 disable nucleus and min-p filtering. max_tokens counts generated tokens. stop strings
    end generation when they appear in the detokenized output (the output is trimmed before
    them); stop_token_ids and (unless ignore_eos) the model's EOS ids end it after that token.
    seed makes sampling reproducible whatever else is in the batch (None: derived from the
    engine seed and the request number). logprobs: None, or how many top log-probabilities
    (0..MAX_LOGPROBS) to return per token besides the chosen token's own. detokenize False
    leaves the output text empty (token ids only, as vLLM's; stop strings need the text):
    the server's engine process runs so, its API process detokenizes.

    Penalties and biases (vLLM's and OpenAI's definitions, applied on the device in this order
    to the logits that choose the token; the returned logprobs stay those of the raw model
    distribution): logit_bias (token id -> value in [-100, 100], a dict or (id, value) pairs)
    is added; until min_tokens tokens are generated the EOS ids (unless ignore_eos) and
    stop_token_ids are banned and no stop string or stop token ends the output;
    repetition_penalty (> 0, 1 is off; CTRL / transformers) divides the positive logits and
    multiplies the negative ones of every token in the prompt or the output so far;
    frequency_penalty and presence_penalty (in [-2, 2]) subtract their value times the token's
    count in the output, and once if it occurs there at all. max_tokens 0 ends the request
    after its prompt (for prompt_logprobs). prompt_logprobs: None, or how many top
    log-probabilities (0..MAX_LOGPROBS) to return for every prompt position besides the prompt
    token's own (the first prompt token has none); such a request computes its whole prompt
    (no KV prefix is reused).

    Structured outputs (at most one; jvt.structured, llguidance): json_schema (a JSON Schema,
    a dict or its JSON text), regex (the output matches it), choice (the output is one of
    these strings), grammar (a Lark grammar, or llama.cpp's GBNF when it has "::=" rules),
    json_object (any JSON object). Each token is drawn from the distribution restricted to the
    allowed tokens (greedy or sampled); once the constraint is complete only EOS is allowed. A
    constraint the library refuses is a ValueError when the request is added.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    detokenize: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    json_schema: str | None = None  # a dict is kept as its canonical JSON text
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_number("temperature", self.temperature, lo=0.0)
        _check_int("top_k", self.top_k, lo=0, hi=INT32_MAX)
        _check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_number("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_int("max_tokens", self.max_tokens, lo=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0, hi=INT32_MAX)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**32 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if not isinstance(self.detokenize, bool):
            raise ValueError(f"SamplingParams.detokenize must be a bool, got {self.detokenize!r}")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop needs the output text: stop strings and "
                             "detokenize=False cannot go together")
        _check_number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, lo=0, hi=self.max_tokens)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        self._check_constraint()

    def _check_constraint(self) -> None:
        schema = self.json_schema
        if isinstance(schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(schema, sort_keys=True))
        elif schema is not None:
            try:
                parsed = json.loads(schema) if isinstance(schema, str) else None
            except ValueError:
                parsed = None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("SamplingParams.json_schema must be a JSON Schema (a dict or "
                                 f"its JSON text), got {str(schema)[:80]!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"SamplingParams.{name} must be a non-empty str, got {value!r}")
        if self.choice is not None:
            choice = tuple(self.choice) if isinstance(self.choice, (list, tuple)) else None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError("SamplingParams.choice must be a non-empty list of non-empty "
                                 f"strings, got {self.choice!r}")
            object.__setattr__(self, "choice", choice)
        if not isinstance(self.json_object, bool):
            raise ValueError(f"SamplingParams.json_object must be a bool, got "
                             f"{self.json_object!r}")
        given = [n for n in CONSTRAINTS if getattr(self, n) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"SamplingParams.{given[1]}: at most one of {', '.join(CONSTRAINTS)} "
                             f"may be given, got {' and '.join(given)}")

    @functools.cached_property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, spec) of the structured-output constraint, or None (spec: JSON text for
        json_schema and choice, the text itself otherwise)."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        if self.grammar is not None:
            return "grammar", self.grammar
        if self.json_object:
            return "json_object", ""
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Whether a top-k, top-p or min-p filter shapes the distribution this request draws
        from (jvt.sampling.unfiltered is the device's copy of this rule)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    @functools.cached_property
    def penalized(self) -> bool:
        """Whether the step changes this request's logits before choosing a token."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0 or bool(self.logit_bias)
                or self.min_tokens > 0)


MAX_LOGPROBS = 8  # top log-probabilities the step computes for every sampled token
CONSTRAINTS = ("json_schema", "regex", "choice", "grammar", "json_object")
INT32_MAX = 2**31 - 1  # the largest value a step's int32 arrays hold (top_k, token ids)


def _check_int(name: str, value, *, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"SamplingParams.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value}")


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, value) pairs, each checked (ids against the vocabulary
    happen in the engine)."""
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = [tuple(item) for item in items]
    except TypeError:
        pairs = None
    if pairs is None or any(len(p) != 2 for p in pairs):
        raise ValueError("SamplingParams.logit_bias must be a dict of token id -> bias or "
                         f"(token id, bias) pairs, got {bias!r}")
    for token, value in pairs:
        _check_int("logit_bias token id", token, lo=0, hi=INT32_MAX)
        _check_number("logit_bias value", value, lo=-100.0, hi=100.0)
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError("SamplingParams.logit_bias has a token id twice")
    return tuple(sorted((int(t), float(v)) for t, v in pairs))


def _check_number(name: str, value, *, lo: float, hi: float | None = None,
                  lo_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be a finite number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        right = f"{hi}]" if hi is not None else "inf)"
        raise ValueError(f"SamplingParams.{name} must be in {left}{lo}, {right}, got {value}")


@dataclasses.dataclass
class RequestMetrics:
    """Timings (seconds, time.perf_counter clock) and KV reuse of one request.

    token_times[i] is when generated token i reached the host; ttft is token_times[0] -
    arrival_time; itl are the gaps between consecutive tokens.
    """

    arrival_time: float
    scheduled_time: float | None = None  # when a step first ran the request (end of queueing)
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished_time: float | None = None
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0  # prompt tokens whose KV came from another slot or a turn
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token (None with fewer than two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


@dataclasses.dataclass
class Logprob:
    """The log-probability of a generated token and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: dict[int, float]  # up to SamplingParams.logprobs entries: token id -> logprob
    rank: int | None = None  # the token's rank (1: most likely); set for prompt logprobs


FINISH_REASONS = ("stop", "length", "abort", "error")  # error: RequestOutput.error says why


class RequestError(RuntimeError):
    """A request failed inside the engine (admitting, packing or post-processing it); the
    engine itself goes on. ``request_id`` names it."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id


@dataclasses.dataclass
class RequestOutput:
    """The result of one request: generated text and ids, why it ended, metrics, logprobs.

    token_ids include a final stop or EOS token; text is the detokenized output with special
    tokens skipped and trimmed before a matched stop string. error is set (and finish_reason
    is "error") when the engine failed on this request alone.
    """

    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # one of FINISH_REASONS once finished
    metrics: RequestMetrics
    logprobs: list[Logprob] | None = None
    error: str | None = None
    # SamplingParams.prompt_logprobs: one per prompt token, None for the first
    prompt_logprobs: list[Logprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class StreamDelta:
    """What one request produced since its previous delta (Engine.stream)."""

    request_id: str
    text: str  # new text (held back while it may still become a stop string)
    token_ids: list[int]  # new token ids
    finish_reason: str | None  # set on the last delta
    logprobs: list[Logprob] | None = None  # one per new token id when the request asked
    prompt_logprobs: list[Logprob | None] | None = None  # on the first delta, when asked

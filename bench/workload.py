"""Synthetic ShareGPT-like workloads: mixed request lengths with Poisson arrivals, and
multi-turn conversations. Deterministic for a given seed (numpy PCG64).

Length distributions (tokens; with the byte-level tokenizer of the random-weight presets one
token is one byte, so a prompt of n tokens is n ASCII characters):

- prompt: lognormal with mean 161 and sigma 1.0 (median 98), the ShareGPT input mean reported
  by the vLLM paper (Kwon et al. 2023, Table 1: input 161, output 338 tokens on average);
- output: lognormal with mean 338 and sigma 0.8 (median 245);
- both clipped to [min_len, max_prompt] / [min_len, max_output] after rounding.
- arrivals: a Poisson process of `rate` requests/s (exponential gaps); rate = inf means all
  requests arrive at t = 0 (offline throughput).

Conversations (multi-turn chat): each user turn lognormal(mean 60, sigma 0.7) tokens, each
answer a fixed `answer_len` tokens (so both retention modes produce the same work).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

PROMPT_MEAN, PROMPT_SIGMA = 161.0, 1.0
OUTPUT_MEAN, OUTPUT_SIGMA = 338.0, 0.8
TURN_MEAN, TURN_SIGMA = 60.0, 0.7
_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Request:
    arrival_s: float  # seconds after the start of the run
    prompt: str  # ASCII text of prompt_len characters
    prompt_len: int  # tokens (bytes with the byte-level tokenizer)
    output_len: int  # tokens to generate (EOS ignored)


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float,
                      lo: int, hi: int) -> np.ndarray:
    """n integer lengths, lognormal with the given mean and log-sigma, clipped to [lo, hi]."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    mu = math.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)


def text(rng: np.random.Generator, n: int) -> str:
    """n random lowercase letters and spaces (one byte-level token each)."""
    return rng.choice(_ALPHABET, n).tobytes().decode("ascii")


def sharegpt_like(n: int, *, rate: float, seed: int = 0, max_prompt: int = 1024,
                  max_output: int = 1024, min_len: int = 4) -> list[Request]:
    """n requests with ShareGPT-like lengths arriving as a Poisson process of `rate` req/s."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (math.inf for all at once), got {rate}")
    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, n, PROMPT_MEAN, PROMPT_SIGMA, min_len, max_prompt)
    outputs = lognormal_lengths(rng, n, OUTPUT_MEAN, OUTPUT_SIGMA, min_len, max_output)
    gaps = np.zeros(n) if math.isinf(rate) else rng.exponential(1.0 / rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Request(float(a), text(rng, int(p)), int(p), int(o))
            for a, p, o in zip(arrivals, prompts, outputs)]


def conversations(n: int, *, turns: int = 8, answer_len: int = 64, seed: int = 0,
                  max_turn: int = 256) -> list[list[str]]:
    """n conversations of `turns` user messages each (the answers are generated)."""
    if n < 1 or turns < 1:
        raise ValueError(f"need n >= 1 and turns >= 1, got n={n}, turns={turns}")
    rng = np.random.default_rng(seed)
    lens = lognormal_lengths(rng, n * turns, TURN_MEAN, TURN_SIGMA, 4, max_turn)
    msgs = [text(rng, int(k)) for k in lens]
    return [msgs[i * turns:(i + 1) * turns] for i in range(n)]

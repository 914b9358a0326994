"""On-device sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Each row draws from its own key fold_in(key(seed), counter), where counter is the index of the
token being generated, so a request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jvt.types import MAX_LOGPROBS, SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters of a step (S rows, padding rows greedy)."""

    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, 0 = whole vocabulary
    top_p: jax.Array  # [S] float32 in (0, 1]
    min_p: jax.Array  # [S] float32 in [0, 1]
    seed: jax.Array  # [S] uint32
    counter: jax.Array  # [S] int32 index of the generated token (0 for the first)

    @staticmethod
    def pack(rows: list[tuple[SamplingParams, int, int]], size: int) -> SamplingArrays:
        """numpy arrays for (params, seed, counter) rows, padded greedy up to ``size``."""
        temperature = np.zeros(size, np.float32)
        top_k = np.zeros(size, np.int32)
        top_p = np.ones(size, np.float32)
        min_p = np.zeros(size, np.float32)
        seed = np.zeros(size, np.uint32)
        counter = np.zeros(size, np.int32)
        for i, (p, s, c) in enumerate(rows):
            temperature[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
            seed[i], counter[i] = s, c
        return SamplingArrays(temperature, top_k, top_p, min_p, seed, counter)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: jax.Array  # [S] int32 chosen token
    logprob: jax.Array  # [S] float32 log-probability of the chosen token (raw model distribution)
    top_ids: jax.Array  # [S, min(MAX_LOGPROBS, V)] int32 most likely tokens, best first
    top_logprobs: jax.Array  # [S, min(MAX_LOGPROBS, V)] float32 their log-probabilities


def _filtered_logits(x: jax.Array, top_k, top_p, min_p):
    """x: [V] temperature-scaled logits -> (masked logits sorted descending, their token ids)."""
    vocab = x.shape[0]
    sorted_x, ids = jax.lax.top_k(x, vocab)
    rank = jnp.arange(vocab)
    keep = (top_k == 0) | (rank < top_k)
    sorted_x = jnp.where(keep, sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x)
    keep &= (jnp.cumsum(probs) - probs) < top_p  # the smallest prefix reaching top_p mass
    keep &= probs >= min_p * probs[0]
    return jnp.where(keep, sorted_x, -jnp.inf), ids


def _sample_row(logits, temperature, top_k, top_p, min_p, seed, counter):
    key = jax.random.fold_in(jax.random.key(seed), counter)
    x = logits / jnp.maximum(temperature, 1e-6)
    masked, ids = _filtered_logits(x, top_k, top_p, min_p)
    return ids[jax.random.categorical(key, masked)]


def sample(logits: jax.Array, p: SamplingArrays, *, greedy_only: bool = False) -> SampleResult:
    """Pick one token per row of ``logits`` [S, V] (float32) under ``p``.

    greedy_only (static) skips the sort behind top-k/top-p when the caller knows no row samples;
    a static switch rather than lax.cond, whose predicate XLA:GPU reads back on the host.
    """
    logits = logits.astype(jnp.float32)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not greedy_only:
        rows = jax.vmap(_sample_row)(logits, p.temperature, p.top_k, p.top_p, p.min_p,
                                     p.seed, p.counter).astype(jnp.int32)
        tokens = jnp.where(p.temperature == 0, tokens, rows)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return SampleResult(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)

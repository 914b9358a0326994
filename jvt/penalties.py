"""Penalties and logit biases on the device: per-slot tables and the logits transformation.

The tables live on the device beside the KV store, one row per slot, and are threaded through
every step (donated, like last_tokens): ``counts`` is how often each token occurs in the output
so far (every step adds its kept samples, so the token sampled by the step in flight is counted
before the host reads it), ``flags`` marks the prompt's tokens (repetition penalty) and the
tokens min_tokens bans (EOS and stop ids), ``bias`` holds the logit_bias. A penalised request's
rows are written from the host when it is admitted (``rows``); other requests never read
theirs, so a slot's stale rows do no harm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jvt import parallel
from jvt.types import SamplingParams

PROMPT, BANNED = 1, 2  # flags bits: the token is in the prompt; min_tokens bans it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyTables:
    counts: jax.Array  # [slots, V] int32 occurrences in the output
    flags: jax.Array  # [slots, V] uint8 PROMPT | BANNED bits
    bias: jax.Array  # [slots, V] float32 logit_bias

    @staticmethod
    def zeros(slots: int, vocab: int, sharding) -> PenaltyTables:
        return parallel.put(PenaltyTables(np.zeros((slots, vocab), np.int32),
                                            np.zeros((slots, vocab), np.uint8),
                                            np.zeros((slots, vocab), np.float32)), sharding)


def rows(params: SamplingParams, tokens: list[int], num_prompt: int, vocab: int,
         eos_ids: tuple[int, ...]) -> PenaltyTables:
    """numpy rows [V] of one sequence whose host-known tokens are ``tokens``."""
    counts = np.bincount(np.asarray(tokens[num_prompt:], np.int64), minlength=vocab)
    flags = np.zeros(vocab, np.uint8)
    flags[np.asarray(tokens[:num_prompt], np.int64)] |= PROMPT
    if params.min_tokens:
        banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))
        flags[np.asarray([t for t in banned if t < vocab], np.int64)] |= BANNED
    bias = np.zeros(vocab, np.float32)
    for token, value in params.logit_bias:
        bias[token] = value
    return PenaltyTables(counts.astype(np.int32), flags, bias)


def set_rows(tables: PenaltyTables, slot: jax.Array, row: PenaltyTables) -> PenaltyTables:
    """tables with slot's rows replaced by ``row`` (jitted, tables donated)."""
    return jax.tree.map(lambda t, r: t.at[slot].set(r), tables, row)


def count(tables: PenaltyTables, slots: jax.Array, tokens: jax.Array) -> PenaltyTables:
    """Add one occurrence of tokens[i] to slot slots[i] (slots out of range are dropped)."""
    counts = tables.counts.at[slots, tokens].add(1, mode="drop")
    return dataclasses.replace(tables, counts=counts)


def penalize(logits: jax.Array, tables: PenaltyTables, slots: jax.Array, presence, frequency,
             repetition, min_tokens, counter, penalized) -> jax.Array:
    """logits [S, V] float32 of rows in ``slots`` [S] -> the logits that choose the tokens.

    presence, frequency, repetition [S] float32; min_tokens, counter [S] int32 (counter: the
    index of the token being chosen); penalized [S] bool (other rows keep their logits).
    """
    counts = tables.counts[slots]
    flags = tables.flags[slots]
    x = logits + tables.bias[slots]
    early = (counter < min_tokens)[:, None]
    x = jnp.where(early & ((flags & BANNED) != 0), -jnp.inf, x)
    seen = ((flags & PROMPT) != 0) | (counts > 0)
    rep = repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    x = x - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    return jnp.where(penalized[:, None], x, logits)

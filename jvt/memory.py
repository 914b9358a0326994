"""KV memory of an engine: bytes per token, the default context length, the physical budget,
and the stores on the engine's devices (one KVStore, or a KVStoreGroup under tensor
parallelism). Rules (docs/engine.md, "Defaults from the model"):

- The physical KV budget is `kv_budget_bytes` when given. Otherwise it is what every slot
  needs at max_model_len, capped, for a host (CPU) store, at a quarter of physical RAM
  (jvt.platform.host_kv_cap): host chunks are ordinary memory.
- max_model_len, when not given, is the model's max_position_embeddings capped so that one
  sequence's KV fits that cap (as vLLM caps max_model_len by the KV cache it can allocate).

Under tensor parallelism every device holds kv_heads / N of each token (after replicating KV
heads when there are fewer than devices): budgets and chunk sizes are per device, and the
host cap applies to the sum over devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jvt import parallel
from jvt.kv import KVStore
from jvt.kv_group import KVStoreGroup
from jvt.models.config import ModelConfig
from jvt.platform import host_kv_cap

GRANULARITY = 2 << 20  # physical allocation granularity (the store's chunk is a multiple)


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """How the KV cache of an engine is laid out on its devices."""

    max_model_len: int  # tokens per slot
    kv_heads: int  # KV heads per device
    token_bytes: int  # KV bytes of one token on one device (all layers, K and V)
    budget_bytes: int  # physical KV bytes per device


def plan(mc: ModelConfig, *, tensor_parallel: int, max_num_seqs: int,
         max_model_len: int | None, kv_budget_bytes: int | None, host: bool) -> KVPlan:
    """The KV layout for model config `mc` (ValueError when the budget or context is
    impossible)."""
    n = tensor_parallel
    kv_heads = parallel.kv_heads_per_device(mc, n)
    token_bytes = mc.num_layers * 2 * kv_heads * mc.head_dim * np.dtype(mc.jnp_dtype).itemsize
    chunk = math.lcm(GRANULARITY, token_bytes)
    cap = kv_budget_bytes // n if kv_budget_bytes else (host_kv_cap() // n if host else None)
    max_len = max_model_len or _default_max_model_len(mc, token_bytes, chunk, cap)
    if max_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len={max_len} exceeds the model's "
                         f"max_position_embeddings ({mc.max_position_embeddings})")
    need = max_num_seqs * chunk * math.ceil(max_len * token_bytes / chunk)
    budget = need if cap is None else (cap if kv_budget_bytes else min(need, cap))
    return KVPlan(max_len, kv_heads, token_bytes, budget)


def make_store(mc: ModelConfig, kv: KVPlan, slots: int,
               devices: list[jax.Device]) -> KVStore | KVStoreGroup:
    """One store per device (host stores for CPU devices); a group for several."""
    stores = [KVStore(mc.num_layers, kv.kv_heads, mc.head_dim, mc.dtype, slots,
                      kv.max_model_len, kv.budget_bytes,
                      "cpu" if d.platform == "cpu" else f"cuda:{d.id}") for d in devices]
    if len(stores) == 1:
        return stores[0]
    return KVStoreGroup(stores, [d.id for d in devices])


def _default_max_model_len(mc: ModelConfig, token_bytes: int, chunk: int,
                           cap: int | None) -> int:
    if cap is None:
        return mc.max_position_embeddings
    fits = (cap // chunk) * (chunk // token_bytes)
    if fits < 2:
        raise ValueError(f"the KV budget ({cap} bytes per device) holds less than two tokens "
                         f"of this model ({token_bytes} bytes each): raise kv_budget_bytes")
    return min(mc.max_position_embeddings, fits)

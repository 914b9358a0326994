"""A static max-length-cache JAX engine, the JetStream/MaxText design, as a baseline.

Every slot owns a preallocated [max_len, Hkv, D] K and V cache per layer ([slots, max_len, Hkv,
D] arrays, donated through each step); attention is jax.nn.dot_product_attention (cuDNN on
GPU, XLA elsewhere) over the whole max_len cache with a length mask; prefill (one request,
prompt padded to a bucket: 64, 256, 1024, ... or max_len) and decode (all slots) are jitted.
The jvt NNX module itself (same weights, same math) with this attention in place of the
KV-store op; greedy sampling only. Continuous batching: an arriving request is prefilled into a free slot between decode steps, as JetStream inserts prefills.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvt.models.config import ModelConfig
from jvt.types import AttnMeta


def default_impl() -> str:
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def _meta(positions: jax.Array) -> AttnMeta:
    """Positions for RoPE; the other fields are unused by the static engine's attention."""
    n = positions.shape[0]
    zeros = jnp.zeros(n, jnp.int32)
    return AttnMeta(positions.astype(jnp.int32), jnp.zeros(n + 1, jnp.int32), zeros, zeros)


def _prefill(graphdef, treedef, weights, tokens, *, impl: str):
    """tokens [P] (one padded request) -> (logits [P, V], per-layer (k, v) [P, Hkv, D]).

    The jvt module itself runs, with dense causal attention over the prompt in place of the
    KV-store op. Independent of the cache shape (JetStream's prefill -> insert split), so one
    compile per prompt bucket serves every slot count."""
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
    kvs = []

    def attend(q, k, v, meta, *, layer, scale):
        kvs.append((k, v))
        return jax.nn.dot_product_attention(q[None], k[None], v[None], scale=scale,
                                            is_causal=True, implementation=impl)[0]

    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    hidden = module(tokens, _meta(positions), attend=attend)
    return module.logits(hidden), kvs


def _insert(cache, kvs, slot):
    """Write a prefill's per-layer (k, v) [P, Hkv, D] at positions [0, P) of `slot`.
    Rows past the prompt are padding: decode masks them by length and overwrites them."""
    return [(jax.lax.dynamic_update_slice(ck, k[None], (slot, 0, 0, 0)),
             jax.lax.dynamic_update_slice(cv, v[None], (slot, 0, 0, 0)))
            for (ck, cv), (k, v) in zip(cache, kvs)]


def _decode(graphdef, treedef, weights, cache, tokens, lengths, *, impl: str):
    """One token per slot at position lengths[s]; returns (greedy next tokens [S], cache)."""
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
    slots = jnp.arange(tokens.shape[0])
    new_cache = list(cache)

    def attend(q, k, v, meta, *, layer, scale):
        ck, cv = cache[layer]
        ck, cv = ck.at[slots, lengths].set(k), cv.at[slots, lengths].set(v)
        new_cache[layer] = (ck, cv)
        return jax.nn.dot_product_attention(q[:, None], ck, cv, scale=scale,
                                            key_value_seq_lengths=lengths + 1,
                                            implementation=impl)[:, 0]

    hidden = module(tokens, _meta(lengths), attend=attend)
    nxt = jnp.argmax(module.logits(hidden), axis=-1).astype(jnp.int32)
    return nxt, new_cache


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, treedef, impl: str):
    """(prefill, insert, decode) jitted once per model, shared by engines of any slot count."""
    return (jax.jit(functools.partial(_prefill, graphdef, treedef, impl=impl)),
            jax.jit(_insert, donate_argnums=0),
            jax.jit(functools.partial(_decode, graphdef, treedef, impl=impl), donate_argnums=1))


@dataclasses.dataclass
class Served:
    """Timings of one served request (perf_counter seconds)."""

    arrival: float
    token_times: list[float] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)


class StaticEngine:
    """Greedy generation with a preallocated [slots, max_len] KV cache per layer."""

    def __init__(self, module, *, slots: int, max_len: int, impl: str | None = None):
        if slots < 1 or max_len < 64:
            raise ValueError(f"need slots >= 1 and max_len >= 64, got {slots}, {max_len}")
        config: ModelConfig = module.config
        self.config, self.slots, self.max_len = config, slots, max_len
        graphdef, state = nnx.split(module)
        self.weights, treedef = jax.tree.flatten(state)  # flattened once, as jvt's runner does
        self.impl = impl or default_impl()
        shape = (slots, max_len, config.num_kv_heads, config.head_dim)
        self.cache = [(jnp.zeros(shape, config.jnp_dtype), jnp.zeros(shape, config.jnp_dtype))
                      for _ in range(config.num_layers)]
        self._prefill, self._insert, self._decode = _jitted(graphdef, treedef, self.impl)

    @property
    def cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.cache)

    def bucket(self, n: int) -> int:
        if not 1 <= n <= self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit max_len={self.max_len}")
        return min(self.max_len, max(64, 1 << 2 * ((n - 1).bit_length() + 1 >> 1)))

    def prefill(self, slot: int, prompt: list[int]) -> jax.Array:
        """Fill `slot` with the prompt; returns logits [bucket, V] (row len-1 is the next)."""
        ids = np.zeros(self.bucket(len(prompt)), np.int32)
        ids[:len(prompt)] = prompt
        logits, kvs = self._prefill(self.weights, jnp.asarray(ids))
        self.cache = self._insert(self.cache, kvs, np.int32(slot))
        return logits

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens, lengths: int32 [slots]; returns the next greedy token of every slot."""
        nxt, self.cache = self._decode(self.weights, self.cache, jnp.asarray(tokens),
                                       jnp.asarray(lengths))
        return np.asarray(nxt)

    def warmup(self, prompt_lens: list[int]) -> None:
        """Compile the prefill buckets of `prompt_lens` and the decode step."""
        for b in sorted({self.bucket(n) for n in prompt_lens}):
            jax.block_until_ready(self.prefill(0, [1] * b))
        self.decode(np.zeros(self.slots, np.int32), np.zeros(self.slots, np.int32))

    def serve(self, requests: list[tuple[float, list[int], int]]) -> list[Served]:
        """Serve (arrival_s, prompt ids, output_len) requests with continuous batching.

        Arrivals are relative to the call. A request's first token comes from its prefill;
        each decode step then advances every active slot by one token."""
        for _, prompt, out_len in requests:
            if len(prompt) + out_len > self.max_len:
                raise ValueError(f"prompt {len(prompt)} + output {out_len} > max_len "
                                 f"{self.max_len}")
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        results = [Served(arrival=0.0) for _ in requests]
        tokens = np.zeros(self.slots, np.int32)
        lengths = np.zeros(self.slots, np.int32)
        active: dict[int, int] = {}  # slot -> request index
        free = list(range(self.slots))[::-1]
        t0 = time.perf_counter()
        nxt_req = 0
        while nxt_req < len(order) or active:
            now = time.perf_counter() - t0
            while free and nxt_req < len(order) and requests[order[nxt_req]][0] <= now:
                i = order[nxt_req]
                nxt_req += 1
                arrival, prompt, out_len = requests[i]
                slot = free.pop()
                first = int(jnp.argmax(self.prefill(slot, prompt)[len(prompt) - 1]))
                results[i].arrival = t0 + arrival
                self._emit(results[i], first)
                tokens[slot], lengths[slot] = first, len(prompt)
                if out_len > 1:
                    active[slot] = i
                else:
                    free.append(slot)
            if not active:
                if nxt_req < len(order):
                    time.sleep(max(0.0, requests[order[nxt_req]][0] - now))
                continue
            out = self.decode(tokens, lengths)
            for slot, i in list(active.items()):
                self._emit(results[i], int(out[slot]))
                tokens[slot] = out[slot]
                lengths[slot] += 1
                if len(results[i].token_ids) == requests[i][2]:
                    del active[slot]
                    free.append(slot)
        return results

    @staticmethod
    def _emit(served: Served, token: int) -> None:
        served.token_times.append(time.perf_counter())
        served.token_ids.append(token)

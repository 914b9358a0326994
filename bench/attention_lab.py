"""Kernel lab: time the CUDA jvt_attention op (KV append + split-KV attention) alone.

    python -m bench.attention_lab [--iters 20]

Decode: B sequences of L cached tokens, one new token each (bf16, Hq 32 / Hkv 8 / D 128, the
design's anchor shapes); floor = KV bytes / 3.0 TB/s (the H100 copy bandwidth in design.md).
Prefill: one causal sequence of T new tokens. Timing only: the store is reserved, not filled
(the kernels read whatever the mapped chunks hold); correctness lives in tests/test_ops_gpu.py.
Each timed call also appends its rows' K/V, as in a real step.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jvt import ops
from jvt.kv import KVStore
from jvt.types import AttnMeta

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
FLOOR_BYTES_PER_S = 3.0e12
DECODE = ((1, 32768), (8, 16384), (32, 4096), (128, 1024), (64, 512))
PREFILL = (97, 1024, 4096)


def make_store(slots: int, max_tokens: int) -> KVStore:
    token_bytes = 2 * KV_HEADS * HEAD_DIM * 2
    budget = slots * (math.ceil(max_tokens * token_bytes / (2 << 20)) + 1) * (2 << 20)
    return KVStore(1, KV_HEADS, HEAD_DIM, "bfloat16", slots, max_tokens, budget, device="cuda:0")


def time_op(store: KVStore, rows: int, meta: AttnMeta, iters: int) -> float:
    """Device seconds per op call (best of 3 programs) on random q/k/v of `rows` rows.

    One jitted program chains `iters` calls (each call's output is the next call's q), so the
    time is the GPU's (4 launches per call included), not Python's dispatch.
    """
    key = jax.random.PRNGKey(0)
    q = jax.random.normal(key, (rows, Q_HEADS, HEAD_DIM), jnp.bfloat16)
    kv = jax.random.normal(key, (rows, KV_HEADS, HEAD_DIM), jnp.bfloat16)

    @jax.jit
    def chain(q, kv, meta):
        for _ in range(iters):
            q = ops.attention(q, kv, kv, meta, store_id=store.store_id, layer=0,
                              scale=HEAD_DIM**-0.5)
        return q

    chain(q, kv, meta).block_until_ready()
    store.check()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        chain(q, kv, meta).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best / iters


def meta_of(seq_start, seq_len) -> AttnMeta:
    rows = seq_start[-1]
    return AttnMeta(positions=jnp.zeros(rows, jnp.int32),
                    seq_start=jnp.asarray(seq_start, jnp.int32),
                    seq_slot=jnp.arange(len(seq_len), dtype=jnp.int32),
                    seq_len=jnp.asarray(seq_len, jnp.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=20, help="op calls per timed program")
    args = ap.parse_args()
    jax.devices()
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'case':<9}{'shape':>14}{'ms':>10}{'GB/s':>9}{'floor ms':>10}{'% floor':>9}")
    for batch, length in DECODE:
        with make_store(batch, length) as store:
            for s in range(batch):
                store.reserve(s, length)
            store.apply_pending()
            meta = meta_of(np.arange(batch + 1), [length] * batch)
            sec = time_op(store, batch, meta, args.iters)
        kv_bytes = batch * length * KV_HEADS * HEAD_DIM * 2 * 2
        floor = kv_bytes / FLOOR_BYTES_PER_S
        print(f"{'decode':<9}{f'{batch}x{length}':>14}{sec * 1e3:>10.3f}"
              f"{kv_bytes / sec / 1e9:>9.0f}{floor * 1e3:>10.3f}{100 * floor / sec:>9.0f}")
    print(f"{'case':<9}{'tokens':>14}{'ms':>10}{'TFLOP/s':>9}")
    for tokens in PREFILL:
        with make_store(1, tokens) as store:
            store.reserve(0, tokens)
            store.apply_pending()
            sec = time_op(store, tokens, meta_of([0, tokens], [tokens]), max(args.iters // 5, 2))
        flops = 4 * Q_HEADS * HEAD_DIM * tokens * (tokens + 1) / 2
        print(f"{'prefill':<9}{tokens:>14}{sec * 1e3:>10.3f}{flops / sec / 1e12:>9.1f}")


if __name__ == "__main__":
    main()

"""jvt_attention on CUDA against the fp32 reference (jvt.ops.reference_attention).

Tolerance, flash-attention's rule: max|out - ref| <= 2 * max|lowprec - ref| + 1e-5 over the
real rows, where lowprec is the same attention evaluated in the low precision (fp32 matmul
accumulation, scores, probabilities and output rounded to bf16 / f16, like a torch bf16
attention). Padding rows and skipped sequences must be exactly zero. The largest ratio
max|out - ref| / max|lowprec - ref| per dtype is printed as `ERROR_RATIO <dtype> <ratio>` and
written to $OUT/error_ratio.txt when OUT is set.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jvt import ops
from jvt.kv import KVCapacityError, KVStore
from jvt.types import AttnMeta

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
NP_DTYPES = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}
# (head_dim, q_heads, kv_heads, layers): GQA 4 and 8, MHA, MQA with 16 q heads (two CTAs per
# KV head), and a group of 3 (a CTA with an idle head). Many layers make a token 16-64 KiB,
# so a 2 MiB chunk holds 32-128 tokens and the steps below cross chunk boundaries.
SPECS = {
    "gqa4-d128": (128, 32, 8, 16),
    "mha-d64": (64, 8, 8, 32),
    "gqa8-d128": (128, 16, 2, 64),
    "mqa-d64": (64, 16, 1, 64),
    "gqa3-d64": (64, 12, 4, 32),
}
SLOTS, MAX_TOKENS = 4, 768
RATIOS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_error_ratios():
    jax.devices()  # JAX owns the GPU before a store touches it
    yield
    lines = [f"ERROR_RATIO {name} {ratio:.3f}" for name, ratio in sorted(RATIOS.items())]
    print("\n" + "\n".join(lines))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "error_ratio.txt"), "a") as f:
            f.write("\n".join(lines) + "\n")


def make_store(dtype, head_dim, kv_heads, layers) -> KVStore:
    return KVStore(layers, kv_heads, head_dim, jnp.dtype(dtype), SLOTS, MAX_TOKENS,
                   budget_bytes=1 << 30, device="cuda:0")


def lowprec_attention(q, keys, values, pos, scale, np_dtype):
    """One sequence in low precision: q [n, Hq, D]; keys, values [M, Hkv, D]; pos [n]."""
    def rnd(x):
        return np.asarray(x, np.float32).astype(np_dtype).astype(np.float32)

    n, hq, d = q.shape
    m, hkv, _ = keys.shape
    qg = rnd(q).reshape(n, hkv, hq // hkv, d).transpose(1, 0, 2, 3).reshape(hkv, -1, d)
    scores = rnd(qg @ rnd(keys).transpose(1, 2, 0)).reshape(hkv, n, hq // hkv, m) * scale
    scores = np.where(np.arange(m)[None, None, None, :] <= pos[None, :, None, None], scores,
                      -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = rnd(probs / probs.sum(-1, keepdims=True)).reshape(hkv, -1, m)
    out = rnd(probs @ rnd(values).transpose(1, 0, 2))  # [Hkv, n * G, D]
    return out.reshape(hkv, n, hq // hkv, d).transpose(1, 0, 2, 3).reshape(n, hq, d)


class Mirror:
    """Runs the op on a CUDA store and keeps the expected fp32 KV of the layers it touches."""

    def __init__(self, store: KVStore, q_heads: int, layers, seed: int):
        self.store, self.q_heads, self.layers = store, q_heads, tuple(layers)
        shape = (store.slots, store.max_tokens, store.kv_heads, store.head_dim)
        self.k = {layer: np.zeros(shape, np.float32) for layer in self.layers}
        self.v = {layer: np.zeros(shape, np.float32) for layer in self.layers}
        self.lengths = [0] * store.slots
        self.rng = np.random.default_rng(seed)
        self.scale = store.head_dim**-0.5
        layers_, scale = self.layers, self.scale

        def run(qkv, meta):
            return [ops.attention(q, k, v, meta, store_id=store.store_id, layer=layer,
                                  scale=scale) for (q, k, v), layer in zip(qkv, layers_)]

        self.fn = jax.jit(run)

    def batch(self, seqs, *, rows: int, entries: int):
        """Metadata for seqs = [(slot, n new tokens)], `rows` rows, `entries` entries."""
        start, slots, lens, layout = [0], [], [], []
        for slot, n in seqs:
            first, length = start[-1], self.lengths[slot] + n
            layout += [(first + r, slot, length - n + r) for r in range(n)]
            start.append(first + n)
            slots.append(slot)
            lens.append(length)
        assert start[-1] <= rows and len(seqs) <= entries
        positions = np.zeros(rows, np.int32)
        for row, _, pos in layout:
            positions[row] = pos
        pad = entries - len(seqs)
        meta = AttnMeta(positions=jnp.asarray(positions),
                        seq_start=jnp.asarray(start + [start[-1]] * pad, jnp.int32),
                        seq_slot=jnp.asarray(slots + [-1] * pad, jnp.int32),
                        seq_len=jnp.asarray(lens + [0] * pad, jnp.int32))
        return meta, layout

    def inputs(self, rows: int, dtype):
        d, hkv = self.store.head_dim, self.store.kv_heads
        return [jnp.asarray(self.rng.standard_normal(s), dtype)
                for s in ((rows, self.q_heads, d), (rows, hkv, d), (rows, hkv, d))]

    def step(self, seqs, name: str, *, rows: int, entries: int):
        """Reserve, run every layer in one jit, update the mirror, check each layer's output."""
        dtype = self.store.dtype
        meta, layout = self.batch(seqs, rows=rows, entries=entries)
        for slot, n in seqs:
            self.store.reserve(slot, self.lengths[slot] + n)
        self.store.apply_pending()  # the CUDA op maps nothing itself
        qkv = [self.inputs(rows, dtype) for _ in self.layers]
        outs = self.fn(qkv, meta)
        for (_, k, v), layer in zip(qkv, self.layers):
            k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
            for row, slot, pos in layout:
                self.k[layer][slot, pos] = k[row]
                self.v[layer][slot, pos] = v[row]
        for slot, n in seqs:
            self.lengths[slot] += n
        for (q, _, _), layer, out in zip(qkv, self.layers, outs):
            ref = np.asarray(ops.reference_attention(q, self.k[layer], self.v[layer], meta,
                                                     scale=self.scale))
            self.check(np.asarray(q, np.float32), np.asarray(out, np.float32), ref, layer, seqs,
                       layout, name)
        self.store.check()

    def check(self, q, out, ref, layer, seqs, layout, name):
        real = np.zeros(out.shape[0], bool)
        real[[row for row, _, _ in layout]] = True
        assert np.all(out[~real] == 0.0), "padding rows must be exactly zero"
        lowprec = np.zeros_like(ref)
        first = 0
        for slot, n in seqs:
            pos = np.arange(self.lengths[slot] - n, self.lengths[slot])
            lowprec[first:first + n] = lowprec_attention(
                q[first:first + n], self.k[layer][slot], self.v[layer][slot], pos, self.scale,
                NP_DTYPES[name])
            first += n
        err = np.abs(out[real] - ref[real]).max()
        base = np.abs(lowprec[real] - ref[real]).max()
        assert err <= 2 * base + 1e-5, f"layer {layer}: max error {err}, low-precision {base}"
        RATIOS[name] = max(RATIOS.get(name, 0.0), err / max(base, 1e-6))

    def check_store(self, layer: int, slot: int, positions) -> None:
        for pos in positions:
            k, v = self.store.read_token(slot, pos, layer)
            np.testing.assert_array_equal(np.asarray(k, np.float32), self.k[layer][slot, pos])
            np.testing.assert_array_equal(np.asarray(v, np.float32), self.v[layer][slot, pos])


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_mixed_batches_against_reference(name, spec):
    """Prefills of 1/17/97, decodes, a chunk continuing a cached prefix across a chunk
    boundary, a long prefill (one split) and pure decode steps (many splits); 2 layers/jit."""
    head_dim, q_heads, kv_heads, layers = SPECS[spec]
    with make_store(DTYPES[name], head_dim, kv_heads, layers) as store:
        tpc = store.tokens_per_chunk
        mirror = Mirror(store, q_heads, [0, layers - 1], seed=head_dim + q_heads + kv_heads)
        mirror.step([(0, 1), (1, 17), (2, 97)], name, rows=128, entries=5)
        mirror.step([(2, 1), (1, tpc), (0, 1), (3, 5)], name, rows=tpc + 9, entries=6)
        mirror.step([(3, 600)], name, rows=608, entries=2)
        mirror.step([(1, 1), (3, 1), (0, 1), (2, 1)], name, rows=4, entries=4)
        mirror.step([(3, 1)], name, rows=1, entries=1)
        for layer in mirror.layers:
            mirror.check_store(layer, 1, range(mirror.lengths[1]))
            mirror.check_store(layer, 3, [0, 4, 5, tpc - 1, tpc, 604, 605, 606])


def test_shared_prefix_slots():
    """Slot 1 maps slot 0's whole prefix chunks; both continue, neither disturbs the other."""
    head_dim, q_heads, kv_heads, layers = SPECS["gqa4-d128"]
    with make_store(jnp.bfloat16, head_dim, kv_heads, layers) as store:
        tpc = store.tokens_per_chunk
        mirror = Mirror(store, q_heads, [3], seed=11)
        prompt = 2 * tpc + 5
        mirror.step([(0, prompt)], "bf16", rows=prompt, entries=1)
        shared = store.share(1, 0, prompt)
        assert shared == 2 * tpc
        mirror.k[3][1, :shared] = mirror.k[3][0, :shared]
        mirror.v[3][1, :shared] = mirror.v[3][0, :shared]
        mirror.lengths[1] = shared
        mirror.step([(1, prompt - shared + 3), (0, 1)], "bf16", rows=16, entries=2)
        mirror.step([(0, 1), (1, 1)], "bf16", rows=2, entries=2)
        mirror.check_store(3, 0, range(mirror.lengths[0]))
        mirror.check_store(3, 1, range(mirror.lengths[1]))


def test_capacity_violation_zeroes_and_flags_without_fault():
    head_dim, q_heads, kv_heads, layers = SPECS["gqa4-d128"]
    with make_store(jnp.bfloat16, head_dim, kv_heads, layers) as store:
        mirror = Mirror(store, q_heads, [1], seed=5)
        mirror.step([(0, 3), (1, 4)], "bf16", rows=8, entries=2)
        capacity = int(store.capacity()[0])
        # Rows: slot 0 beyond its capacity, slot 1 valid, slot SLOTS out of range, slot 2
        # with seq_len < new tokens.
        n_bad = capacity + 2 - mirror.lengths[0]
        before = [store.read_token(0, pos, 1) for pos in range(capacity)]
        start = [0, n_bad, n_bad + 1, n_bad + 2, n_bad + 4]
        meta = AttnMeta(positions=jnp.zeros(n_bad + 5, jnp.int32),
                        seq_start=jnp.asarray(start, jnp.int32),
                        seq_slot=jnp.asarray([0, 1, SLOTS, 2], jnp.int32),
                        seq_len=jnp.asarray([capacity + 2, 5, 1, 1], jnp.int32))
        q, k, v = mirror.inputs(n_bad + 5, jnp.bfloat16)
        out = ops.attention(q, k, v, meta, store_id=store.store_id, layer=1, scale=mirror.scale)
        out = np.asarray(out, np.float32)
        assert np.all(out[:n_bad] == 0.0) and np.all(out[n_bad + 1:] == 0.0)
        mirror.k[1][1, 4], mirror.v[1][1, 4] = np.asarray(k[n_bad]), np.asarray(v[n_bad])
        mirror.lengths[1] = 5
        ref = np.asarray(ops.reference_attention(
            q[n_bad:n_bad + 1], mirror.k[1], mirror.v[1],
            AttnMeta(positions=jnp.zeros(1, jnp.int32), seq_start=jnp.asarray([0, 1], jnp.int32),
                     seq_slot=jnp.asarray([1], jnp.int32), seq_len=jnp.asarray([5], jnp.int32)),
            scale=mirror.scale))
        np.testing.assert_allclose(out[n_bad], ref[0], atol=2e-2, rtol=1e-2)
        with pytest.raises(KVCapacityError):
            store.check()
        store.check()  # cleared
        for pos in range(capacity):  # nothing of the rejected sequence was written
            after = store.read_token(0, pos, 1)
            np.testing.assert_array_equal(after[0], before[pos][0])
            np.testing.assert_array_equal(after[1], before[pos][1])
        mirror.check_store(1, 1, range(5))
        # The device is still healthy: a valid step right after works.
        mirror.step([(0, 1), (1, 2)], "bf16", rows=4, entries=2)


def test_trace_time_errors():
    with make_store(jnp.bfloat16, 96, 2, 2) as store:
        q, kv = jnp.ones((1, 4, 96), jnp.bfloat16), jnp.ones((1, 2, 96), jnp.bfloat16)
        meta = AttnMeta(positions=jnp.zeros(1, jnp.int32), seq_start=jnp.asarray([0, 1], jnp.int32),
                        seq_slot=jnp.asarray([0], jnp.int32), seq_len=jnp.asarray([1], jnp.int32))
        with pytest.raises(ValueError, match="head_dim 96"):
            ops.attention(q, kv, kv, meta, store_id=store.store_id, layer=0, scale=1.0)
    with make_store(jnp.float32, 64, 2, 2) as store:
        q, kv = jnp.ones((1, 4, 64), jnp.float32), jnp.ones((1, 2, 64), jnp.float32)
        with pytest.raises(ValueError, match="float32 is not supported on CUDA"):
            ops.attention(q, kv, kv, meta, store_id=store.store_id, layer=0, scale=1.0)


def test_host_store_rejected_by_the_cuda_handler():
    """A store on the host cannot be read by the CUDA kernels: an FFI error, never a fault."""
    with KVStore(2, 2, 64, jnp.bfloat16, SLOTS, MAX_TOKENS, budget_bytes=1 << 24,
                 device="cpu") as store:
        store.reserve(0, 1)
        store.apply_pending()
        q, kv = jnp.ones((1, 4, 64), jnp.bfloat16), jnp.ones((1, 2, 64), jnp.bfloat16)
        meta = AttnMeta(positions=jnp.zeros(1, jnp.int32), seq_start=jnp.asarray([0, 1], jnp.int32),
                        seq_slot=jnp.asarray([0], jnp.int32), seq_len=jnp.asarray([1], jnp.int32))
        assert q.devices() == {jax.devices("gpu")[0]}
        with pytest.raises(Exception, match="lives on cpu but the op runs on cuda:0"):
            out = ops.attention(q, kv, kv, meta, store_id=store.store_id, layer=0, scale=1.0)
            out.block_until_ready()

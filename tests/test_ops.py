"""jvt_attention on the CPU against the fp32 reference, and the reference against numpy.

Spec choice: 64 layers x 4 KV heads x head_dim 64 makes a token 64 KiB (bf16/f16) or 128 KiB
(f32), so a 2 MiB chunk holds only 32 or 16 tokens and short sequences cross chunk boundaries.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt import ops
from jvt.kv import KVCapacityError, KVStore
from jvt.types import AttnMeta

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
# The op computes in fp32 from the same inputs; only accumulation order and the final
# rounding to the output dtype differ from the reference.
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}
LAYERS, KV_HEADS, HEAD_DIM, Q_HEADS = 64, 4, 64, 8
SCALE = HEAD_DIM**-0.5


def make_store(dtype, *, slots=4, max_tokens=256, layers=LAYERS, kv_heads=KV_HEADS,
               head_dim=HEAD_DIM, budget_bytes=1 << 30) -> KVStore:
    return KVStore(layers, kv_heads, head_dim, jnp.dtype(dtype), slots, max_tokens,
                   budget_bytes=budget_bytes)


def numpy_attention(q, k_cache, v_cache, rows):
    """Naive per-row oracle: rows is a list of (row, slot, pos); others are zero."""
    t, hq, d = q.shape
    group = hq // k_cache.shape[2]
    out = np.zeros((t, hq, d), np.float64)
    for row, slot, pos in rows:
        for h in range(hq):
            keys = k_cache[slot, : pos + 1, h // group].astype(np.float64)
            values = v_cache[slot, : pos + 1, h // group].astype(np.float64)
            s = keys @ q[row, h].astype(np.float64) * SCALE
            p = np.exp(s - s.max())
            out[row, h] = p @ values / p.sum()
    return out


class Mirror:
    """Drives the op on a store and keeps the expected fp32 KV arrays per layer alongside."""

    def __init__(self, store: KVStore, q_heads: int = Q_HEADS, seed: int = 0):
        self.store, self.q_heads = store, q_heads
        shape = (store.layers, store.slots, store.max_tokens, store.kv_heads, store.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.lengths = [0] * store.slots
        self.rng = np.random.default_rng(seed)

    def batch(self, seqs, *, rows: int, entries: int):
        """Metadata for new tokens seqs = [(slot, n)], padded to `rows` rows, `entries` entries.

        Extra entries have an empty row range and slot -1; rows past the last sequence are
        padding. Returns (meta, [(row, slot, position)] of the real rows).
        """
        start, slot_ids, lens, positions, layout = [0], [], [], np.zeros(rows, np.int32), []
        for slot, n in seqs:
            first, length = start[-1], self.lengths[slot] + n
            for r in range(n):
                positions[first + r] = length - n + r
                layout.append((first + r, slot, length - n + r))
            start.append(first + n)
            slot_ids.append(slot)
            lens.append(length)
        assert start[-1] <= rows and len(seqs) <= entries
        pad = entries - len(seqs)
        meta = AttnMeta(
            positions=jnp.asarray(positions),
            seq_start=jnp.asarray(start + [start[-1]] * pad, jnp.int32),
            seq_slot=jnp.asarray(slot_ids + [-1] * pad, jnp.int32),
            seq_len=jnp.asarray(lens + [0] * pad, jnp.int32),
        )
        return meta, layout

    def inputs(self, rows: int, dtype):
        shapes = [(rows, self.q_heads, self.store.head_dim)] + [
            (rows, self.store.kv_heads, self.store.head_dim)] * 2
        return [jnp.asarray(self.rng.standard_normal(s), dtype) for s in shapes]

    def step(self, seqs, layers, dtype, *, rows: int, entries: int, fn=None):
        """Reserve, run the op for `layers` in one jit, update the mirror, return outputs."""
        meta, layout = self.batch(seqs, rows=rows, entries=entries)
        for slot, n in seqs:
            self.store.reserve(slot, self.lengths[slot] + n)
        qkv = [self.inputs(rows, dtype) for _ in layers]
        fn = fn or jitted_layers(self.store.store_id, tuple(layers))
        outs = fn(qkv, meta)
        for (q, k, v), layer in zip(qkv, layers):
            for row, slot, pos in layout:
                self.k[layer, slot, pos] = np.asarray(k[row], np.float32)
                self.v[layer, slot, pos] = np.asarray(v[row], np.float32)
        for slot, n in seqs:
            self.lengths[slot] += n
        refs = [np.asarray(ops.reference_attention(q, self.k[layer], self.v[layer], meta,
                                                   scale=SCALE))
                for (q, _, _), layer in zip(qkv, layers)]
        return outs, refs, layout, meta

    def check_store(self, layer: int, slot: int, positions) -> None:
        for pos in positions:
            k, v = self.store.read_token(slot, pos, layer)
            np.testing.assert_array_equal(np.asarray(k, np.float32), self.k[layer, slot, pos])
            np.testing.assert_array_equal(np.asarray(v, np.float32), self.v[layer, slot, pos])


def jitted_layers(store_id: int, layers: tuple[int, ...]):
    def run(qkv, meta):
        return [ops.attention(q, k, v, meta, store_id=store_id, layer=layer, scale=SCALE)
                for (q, k, v), layer in zip(qkv, layers)]

    return jax.jit(run)


def assert_close(out, ref, layout, dtype):
    out = np.asarray(out, np.float32)
    real = np.zeros(out.shape[0], bool)
    real[[row for row, _, _ in layout]] = True
    assert np.all(out[~real] == 0.0), "padding rows must be exactly zero"
    err = np.abs(out[real] - ref[real]).max()
    assert err <= TOL[dtype] * max(1.0, np.abs(ref[real]).max()), f"max error {err}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batches_against_reference(isa, dtype):
    """Prefill chunks, decode tokens and a continued cached prefix in one step, over 3 steps
    (each kernel version)."""
    with make_store(dtype) as store:
        tpc = store.tokens_per_chunk
        assert tpc in (16, 32)
        mirror = Mirror(store, seed=int(tpc))
        layer = 37
        # Step 1: fresh prefills of 1, 17 and 97 tokens (97 crosses several chunks).
        outs, refs, layout, _ = mirror.step([(0, 1), (1, 17), (2, 97)], [layer], dtype,
                                            rows=128, entries=5)
        assert_close(outs[0], refs[0], layout, dtype)
        # Step 2: decode slot 2 at position 97, a chunk continuing slot 1 across a chunk
        # boundary (17 -> 17 + tpc), a decode on slot 0, and a new sequence in slot 3.
        seqs = [(2, 1), (1, tpc), (0, 1), (3, 5)]
        outs, refs, layout, _ = mirror.step(seqs, [layer], dtype, rows=64, entries=6)
        assert_close(outs[0], refs[0], layout, dtype)
        # Step 3: decode only, every slot, different entry order.
        outs, refs, layout, _ = mirror.step([(3, 1), (0, 1), (2, 1), (1, 1)], [layer], dtype,
                                            rows=8, entries=4)
        assert_close(outs[0], refs[0], layout, dtype)
        mirror.check_store(layer, 1, range(mirror.lengths[1]))
        mirror.check_store(layer, 2, [0, tpc - 1, tpc, 97, 98])
        store.check()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_gqa_mqa(isa, seed):
    """Random specs (GQA, MQA, odd head_dim), random steps; op vs reference each step (each
    kernel version)."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[seed % 3]
    kv_heads = int(rng.choice([1, 2, 3]))
    q_heads = kv_heads * int(rng.choice([1, 2, 4]))
    head_dim = int(rng.choice([8, 24, 64, 136]))
    # Odd head counts and dims give odd token sizes, hence chunks of up to ~300 MiB (sparse
    # memfds: only touched pages cost memory); the budget only has to admit one per slot.
    with make_store(dtype, slots=5, max_tokens=200, layers=3, kv_heads=kv_heads,
                    head_dim=head_dim, budget_bytes=1 << 34) as store:
        mirror = Mirror(store, q_heads=q_heads, seed=seed)
        for _ in range(4):
            slots = rng.permutation(5)[: rng.integers(1, 5)]
            seqs = [(int(s), int(rng.choice([1, 1, 2, 17, 33]))) for s in slots]
            seqs = [(s, n) for s, n in seqs if mirror.lengths[s] + n <= 200]
            rows = sum(n for _, n in seqs) + int(rng.integers(0, 4))
            layer = int(rng.integers(0, 3))
            outs, refs, layout, _ = mirror.step(seqs, [layer], dtype, rows=rows,
                                                entries=len(seqs) + 1)
            assert_close(outs[0], refs[0], layout, dtype)
        store.check()


class SharpMirror(Mirror):
    """Queries 40x larger: scores spread over hundreds, so most keys' e^(s - max) fall far
    below float32's smallest normal number and the softmax is nearly one-hot."""

    def inputs(self, rows: int, dtype):
        q, k, v = super().inputs(rows, dtype)
        return [(q.astype(jnp.float32) * 40).astype(dtype), k, v]


@pytest.mark.parametrize("head_dim", [64, 40, 8])
@pytest.mark.parametrize("sharp", [False, True])
def test_long_prefill_then_decode(isa, head_dim, sharp):
    """A 700-token prefill (44 row tiles, 11 key blocks) then decode steps, float32 KV read
    in place (head_dim 64) or through the padded copy (40, 8), ordinary and extreme scores:
    op vs reference each step (each kernel version)."""
    dtype = jnp.float32
    with make_store(dtype, slots=2, max_tokens=800, layers=2, kv_heads=2, head_dim=head_dim,
                    budget_bytes=1 << 32) as store:
        mirror = (SharpMirror if sharp else Mirror)(store, q_heads=6, seed=head_dim)
        for seqs, rows in (([(0, 700)], 704), ([(0, 1), (1, 3)], 4), ([(0, 1)], 1)):
            outs, refs, layout, _ = mirror.step(seqs, [1], dtype, rows=rows, entries=2)
            assert_close(outs[0], refs[0], layout, dtype)
        store.check()


def test_several_layers_in_one_jit_write_their_own_kv():
    dtype = jnp.bfloat16
    with make_store(dtype) as store:
        mirror = Mirror(store, seed=7)
        layers = [0, 5, 63]
        for seqs in ([(0, 20), (1, 3)], [(0, 1), (1, 30)]):
            outs, refs, layout, _ = mirror.step(seqs, layers, dtype, rows=40, entries=3)
            for out, ref in zip(outs, refs):
                assert_close(out, ref, layout, dtype)
        for layer in layers:
            mirror.check_store(layer, 0, range(21))
            mirror.check_store(layer, 1, range(33))
        untouched_k, untouched_v = store.read_token(0, 3, 1)
        assert not np.any(np.asarray(untouched_k, np.float32))
        assert not np.any(np.asarray(untouched_v, np.float32))


def test_shared_prefix_slots():
    """Slot 1 maps slot 0's whole prefix chunks, then both continue independently."""
    dtype = jnp.float32
    with make_store(dtype) as store:
        tpc = store.tokens_per_chunk
        mirror = Mirror(store, seed=11)
        layer = 2
        prompt = 2 * tpc + 5
        outs, refs, layout, _ = mirror.step([(0, prompt)], [layer], dtype, rows=prompt,
                                            entries=1)
        assert_close(outs[0], refs[0], layout, dtype)
        shared = store.share(1, 0, prompt)
        assert shared == 2 * tpc
        mirror.k[:, 1, :shared] = mirror.k[:, 0, :shared]
        mirror.v[:, 1, :shared] = mirror.v[:, 0, :shared]
        mirror.lengths[1] = shared
        # Slot 1 recomputes the tail and goes on; slot 0 decodes in its own tail chunk.
        seqs = [(1, prompt - shared + 3), (0, 1)]
        outs, refs, layout, _ = mirror.step(seqs, [layer], dtype, rows=16, entries=2)
        assert_close(outs[0], refs[0], layout, dtype)
        mirror.check_store(layer, 0, range(mirror.lengths[0]))
        mirror.check_store(layer, 1, range(mirror.lengths[1]))
        store.check()


def test_no_recompilation_when_lengths_change():
    dtype = jnp.float16
    with make_store(dtype) as store:
        mirror = Mirror(store, seed=3)
        fn = jitted_layers(store.store_id, (4,))
        steps = [[(0, 17), (1, 1)], [(0, 1), (1, 9)], [(2, 12), (0, 1)], [(1, 1)]]
        for seqs in steps:
            outs, refs, layout, _ = mirror.step(seqs, [4], dtype, rows=24, entries=3, fn=fn)
            assert_close(outs[0], refs[0], layout, dtype)
        assert fn._cache_size() == 1


def test_capacity_violation_zeroes_that_sequence_and_sets_the_flag():
    dtype = jnp.float32
    with make_store(dtype) as store:
        tpc = store.tokens_per_chunk
        mirror = Mirror(store, seed=5)
        layer = 9
        mirror.step([(0, 3), (1, 4)], [layer], dtype, rows=8, entries=2)
        store.check()
        capacity = int(store.capacity()[0])
        assert capacity == tpc
        before = [store.read_token(0, pos, layer) for pos in range(capacity)]
        # Slot 0 claims tokens up to capacity + 2 without reserving them.
        n_bad = capacity + 2 - mirror.lengths[0]
        meta = AttnMeta(
            positions=jnp.zeros(n_bad + 2, jnp.int32),
            seq_start=jnp.asarray([0, 1, 1 + n_bad], jnp.int32),
            seq_slot=jnp.asarray([1, 0], jnp.int32),
            seq_len=jnp.asarray([5, capacity + 2], jnp.int32),
        )
        q, k, v = mirror.inputs(n_bad + 2, dtype)
        out = ops.attention(q, k, v, meta, store_id=store.store_id, layer=layer, scale=SCALE)
        out = np.asarray(out)
        assert np.all(out[1:] == 0.0)
        mirror.k[layer, 1, 4], mirror.v[layer, 1, 4] = k[0], v[0]
        ref = numpy_attention(np.asarray(q), mirror.k[layer], mirror.v[layer], [(0, 1, 4)])
        np.testing.assert_allclose(out[0], ref[0], atol=2e-5)
        for pos in range(capacity):
            after = store.read_token(0, pos, layer)
            np.testing.assert_array_equal(after[0], before[pos][0])
            np.testing.assert_array_equal(after[1], before[pos][1])
        with pytest.raises(KVCapacityError):
            store.check()
        store.check()  # the flag was cleared


@pytest.mark.parametrize("slot, seq_len, n", [(-1, 3, 2), (4, 3, 2), (0, 1, 2)])
def test_bad_slot_or_length_is_skipped_and_flagged(slot, seq_len, n):
    dtype = jnp.float32
    with make_store(dtype) as store:
        store.reserve(0, 8)
        mirror = Mirror(store, seed=13)
        q, k, v = mirror.inputs(n, dtype)
        meta = AttnMeta(positions=jnp.zeros(n, jnp.int32),
                        seq_start=jnp.asarray([0, n], jnp.int32),
                        seq_slot=jnp.asarray([slot], jnp.int32),
                        seq_len=jnp.asarray([seq_len], jnp.int32))
        out = ops.attention(q, k, v, meta, store_id=store.store_id, layer=0, scale=SCALE)
        assert np.all(np.asarray(out) == 0.0)
        with pytest.raises(KVCapacityError):
            store.check()


def test_masked_sequence_is_skipped_without_error():
    """seq_slot -2 (a row finished inside a K-step call): its rows are padding, nothing of the
    slot is read or written, no error; the other sequences are computed as usual."""
    dtype = jnp.float32
    with make_store(dtype) as store:
        mirror = Mirror(store, seed=17)
        layer = 3
        mirror.step([(0, 5), (1, 3)], [layer], dtype, rows=8, entries=2)
        before = [store.read_token(0, pos, layer) for pos in range(8)]
        store.reserve(0, 8)
        store.reserve(1, 4)
        q, k, v = mirror.inputs(2, dtype)
        meta = AttnMeta(positions=jnp.asarray([5, 3], jnp.int32),
                        seq_start=jnp.asarray([0, 1, 2], jnp.int32),
                        seq_slot=jnp.asarray([-2, 1], jnp.int32),
                        seq_len=jnp.asarray([6, 4], jnp.int32))
        out = np.asarray(ops.attention(q, k, v, meta, store_id=store.store_id, layer=layer,
                                       scale=SCALE))
        store.check()  # no error flagged
        assert np.all(out[0] == 0.0)
        for pos in range(8):
            after = store.read_token(0, pos, layer)
            np.testing.assert_array_equal(after[0], before[pos][0])
        mirror.k[layer, 1, 3], mirror.v[layer, 1, 3] = k[1], v[1]
        ref = numpy_attention(np.asarray(q), mirror.k[layer], mirror.v[layer], [(1, 1, 3)])
        np.testing.assert_allclose(out[1], ref[1], atol=2e-5)
        ref_op = np.asarray(ops.reference_attention(q, mirror.k[layer], mirror.v[layer], meta,
                                                    scale=SCALE))
        assert np.all(ref_op[0] == 0.0)


def test_reference_attention_matches_numpy_oracle():
    rng = np.random.default_rng(17)
    slots, max_tokens, kv_heads, q_heads, head_dim = 3, 41, 2, 6, 24
    k_cache = rng.standard_normal((slots, max_tokens, kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((slots, max_tokens, kv_heads, head_dim)).astype(np.float32)
    # Slot 2: 17 new tokens after 23 cached; an empty entry; slot 0: one decode at 40.
    meta = AttnMeta(positions=jnp.zeros(20, jnp.int32),
                    seq_start=jnp.asarray([0, 17, 17, 18], jnp.int32),
                    seq_slot=jnp.asarray([2, -1, 0], jnp.int32),
                    seq_len=jnp.asarray([40, 0, 41], jnp.int32))
    q = rng.standard_normal((20, q_heads, head_dim)).astype(np.float32)
    rows = [(r, 2, 23 + r) for r in range(17)] + [(17, 0, 40)]
    out = ops.reference_attention(jnp.asarray(q), k_cache, v_cache, meta, scale=SCALE)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k_cache, v_cache, rows),
                               atol=1e-5)


def test_reference_step_scatters_then_attends():
    rng = np.random.default_rng(19)
    cache = np.zeros((2, 10, 1, 8), np.float32)
    q = jnp.asarray(rng.standard_normal((4, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 1, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, 1, 8)), jnp.float32)
    meta = AttnMeta(positions=jnp.zeros(4, jnp.int32), seq_start=jnp.asarray([0, 3], jnp.int32),
                    seq_slot=jnp.asarray([1], jnp.int32), seq_len=jnp.asarray([5], jnp.int32))
    out, k_cache, v_cache = ops.reference_step(q, k, v, cache, cache, meta, scale=SCALE)
    expect_k, expect_v = cache.copy(), cache.copy()
    expect_k[1, 2:5], expect_v[1, 2:5] = np.asarray(k[:3]), np.asarray(v[:3])
    np.testing.assert_array_equal(np.asarray(k_cache), expect_k)
    np.testing.assert_array_equal(np.asarray(v_cache), expect_v)
    ref = numpy_attention(np.asarray(q), expect_k, expect_v, [(r, 1, 2 + r) for r in range(3)])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def _args(store, t=4, s=2, dtype=jnp.float32, hq=Q_HEADS, hkv=KV_HEADS, d=HEAD_DIM):
    meta = AttnMeta(positions=jnp.zeros(t, jnp.int32), seq_start=jnp.zeros(s + 1, jnp.int32),
                    seq_slot=jnp.zeros(s, jnp.int32), seq_len=jnp.zeros(s, jnp.int32))
    return {"q": jnp.ones((t, hq, d), dtype), "k": jnp.ones((t, hkv, d), dtype),
            "v": jnp.ones((t, hkv, d), dtype), "meta": meta, "store_id": store.store_id,
            "layer": 0, "scale": SCALE}


def _replace_meta(args, **fields):
    args["meta"] = dataclasses.replace(args["meta"], **fields)


BAD_ARGS = {
    "q rank": (lambda a: a.update(q=a["q"][0]), "q must have rank 3"),
    "dtype": (lambda a: a.update(q=a["q"].astype(jnp.int32)), "q dtype"),
    "dtype mix": (lambda a: a.update(k=a["k"].astype(jnp.float16)), "dtypes must match"),
    "k/v shape": (lambda a: a.update(v=a["v"][:, :2]), "k and v shapes"),
    "rows": (lambda a: a.update(k=a["k"][:3], v=a["v"][:3]), "k/v shape"),
    "gqa": (lambda a: a.update(q=a["q"][:, :6]), "multiple of k/v heads"),
    "store heads": (lambda a: a.update(k=a["k"][:, :2], v=a["v"][:, :2], q=a["q"][:, :4]),
                    "kv_heads, head_dim"),
    "store dtype": (lambda a: a.update(**{n: a[n].astype(jnp.bfloat16) for n in "qkv"}),
                    "differs from store"),
    "head_dim": (lambda a: a.update(**{n: a[n][..., :60] for n in "qkv"}), "head_dim 60"),
    "meta dtype": (lambda a: _replace_meta(a, seq_len=a["meta"].seq_len.astype(jnp.uint32)),
                   "meta.seq_len must be a 1-D int32"),
    "seq_start": (lambda a: _replace_meta(a, seq_start=jnp.zeros(2, jnp.int32)), "S+1 = 3"),
    "seq_len": (lambda a: _replace_meta(a, seq_len=jnp.zeros(3, jnp.int32)), "meta.seq_len has"),
    "positions": (lambda a: _replace_meta(a, positions=jnp.zeros(5, jnp.int32)), "T = 4"),
    "layer": (lambda a: a.update(layer=LAYERS), "layer 64 outside"),
    "store_id": (lambda a: a.update(store_id=10**6), "not a registered KV store"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_trace_time_value_errors(case):
    mutate, message = BAD_ARGS[case]
    with make_store(jnp.float32) as store:
        args = _args(store)
        mutate(args)
        with pytest.raises(ValueError, match=re.escape(message)):
            ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("meta"), **args)


@pytest.mark.parametrize("attr, value", [("layer", jnp.int32(0)), ("store_id", 1.0),
                                         ("scale", jnp.float32(0.125))])
def test_attributes_must_be_static_python_numbers(attr, value):
    with make_store(jnp.float32) as store:
        args = {**_args(store), attr: value}
        with pytest.raises(TypeError, match=f"{attr} must be a Python"):
            ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("meta"), **args)


def test_native_errors_for_unknown_store():
    """The handler itself rejects a store closed between tracing and running."""
    store = make_store(jnp.float32)
    args = _args(store)
    fn = jax.jit(lambda q, k, v, meta: ops.attention(q, k, v, meta, store_id=args["store_id"],
                                                     layer=0, scale=SCALE))
    fn(args["q"], args["k"], args["v"], args["meta"]).block_until_ready()
    store.close()
    with pytest.raises((RuntimeError, ValueError), match="unknown store_id"):
        fn(args["q"], args["k"], args["v"], args["meta"]).block_until_ready()


@pytest.mark.parametrize("layer, kv_heads, message", [(LAYERS, KV_HEADS, "layer 64 outside"),
                                                       (0, 2, "kv_heads")])
def test_native_validation_of_direct_calls(layer, kv_heads, message):
    """Bypassing jvt.ops' checks, the handler still refuses inconsistent calls."""
    with make_store(jnp.float32) as store:
        args = _args(store, hkv=kv_heads)
        meta = args["meta"]
        ops.register_targets()
        call = jax.ffi.ffi_call(ops.TARGET, (jax.ShapeDtypeStruct(args["q"].shape, jnp.float32),
                                             jax.ShapeDtypeStruct((1,), jnp.uint8)))
        with pytest.raises((RuntimeError, ValueError), match=message):
            call(args["q"], args["k"], args["v"], meta.seq_start, meta.seq_slot, meta.seq_len,
                 store_id=np.int32(store.store_id), layer=np.int32(layer),
                 scale=np.float32(SCALE)).block_until_ready()

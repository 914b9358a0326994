"""KV store on the host backend: layout, data integrity, sharing, draining, every error path."""

import ctypes
import math

import ml_dtypes
import numpy as np
import pytest

import jvt
from jvt import _native
from jvt.kv import KVCacheFull, KVCapacityError, KVStore, cuda_available

MiB = 1 << 20


@pytest.fixture
def device():
    """The backend under test; tests/test_kv_gpu.py reruns these tests with "cuda:0"."""
    return "cpu"


def make(layers=2, kv_heads=2, head_dim=64, dtype="float32", slots=4, max_tokens=5000,
         budget_chunks=8, **kw):
    token_bytes = layers * 2 * kv_heads * head_dim * np.dtype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    chunk = math.lcm(2 * MiB, token_bytes)
    return KVStore(layers, kv_heads, head_dim, dtype, slots, max_tokens, budget_chunks * chunk,
                   **kw)


def token_kv(store, seed):
    rng = np.random.default_rng(seed)
    shape = (store.kv_heads, store.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32)


def write_all(store, slot, positions, tag):
    """Fill (slot, pos, layer) with values derived from (tag, pos, layer); return them."""
    data = {}
    for pos in positions:
        for layer in range(store.layers):
            k, v = token_kv(store, hash((tag, pos, layer)) % 2**32)
            store.write_token(slot, pos, layer, k, v)
            data[pos, layer] = (k.astype(store.dtype), v.astype(store.dtype))
    return data


def assert_reads(store, slot, data):
    for (pos, layer), (k, v) in data.items():
        rk, rv = store.read_token(slot, pos, layer)
        np.testing.assert_array_equal(rk, k)
        np.testing.assert_array_equal(rv, v)


# ---- layout -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,kv_heads,head_dim,dtype,token_bytes,chunk_bytes",
    [
        (32, 8, 128, "bfloat16", 128 * 1024, 2 * MiB),  # Llama-3-8B: 16 tokens per chunk
        (16, 8, 64, "bfloat16", 32 * 1024, 2 * MiB),  # Llama-3.2-1B: 64 tokens per chunk
        (80, 1, 128, "bfloat16", 40960, 10 * MiB),  # 80-layer, 1-KV-head shard
        (3, 1, 1, "float32", 24, 6 * MiB),  # token size with a factor of 3
        (1, 1, 1, "float16", 4, 2 * MiB),
        (7, 3, 17, np.float16, 7 * 2 * 3 * 17 * 2, 2 * MiB * 7 * 3 * 17),
    ],
)
def test_layout_chunk_rule(layers, kv_heads, head_dim, dtype, token_bytes, chunk_bytes):
    with KVStore(layers, kv_heads, head_dim, dtype, 3, 97, chunk_bytes) as s:
        assert s.token_bytes == token_bytes
        assert s.chunk_bytes == chunk_bytes == math.lcm(2 * MiB, token_bytes)
        assert s.tokens_per_chunk == chunk_bytes // token_bytes
        assert s.chunks_per_slot == -(-97 // s.tokens_per_chunk)
        assert s.slot_stride == s.chunks_per_slot * chunk_bytes
        assert s.budget_chunks == 1


def test_dtype_spellings():
    import jax.numpy as jnp

    for spelling, want in [("bfloat16", ml_dtypes.bfloat16), (jnp.bfloat16, ml_dtypes.bfloat16),
                           (np.float16, np.float16), ("float32", np.float32),
                           (jnp.float32, np.float32)]:
        with KVStore(1, 1, 8, spelling, 1, 10, 2 * MiB) as s:
            assert s.dtype == np.dtype(want)


def test_address_formula_matches_layout():
    """Bytes written through the hook sit exactly where the kernel contract says."""
    with make(layers=3, kv_heads=2, head_dim=5, dtype="float32", slots=3, max_tokens=300) as s:
        for slot in range(3):
            s.reserve(slot, 300)
        s.apply_pending()
        slot, pos, layer = 2, 217, 1
        k = np.arange(10, dtype=np.float32).reshape(2, 5)
        v = -k - 1
        s.write_token(slot, pos, layer, k, v)
        for kv, want in ((0, k), (1, v)):
            for h in range(2):
                addr = (s.base + slot * s.slot_stride + pos * s.token_bytes
                        + ((layer * 2 + kv) * 2 + h) * 5 * 4)
                got = np.ctypeslib.as_array((ctypes.c_float * 5).from_address(addr))
                np.testing.assert_array_equal(got, want[h])


# ---- reserve / apply_pending ----------------------------------------------------------------


def test_reserve_maps_in_background_and_capacity_follows(device):
    with make(device=device, max_tokens=5000) as s:
        tpc = s.tokens_per_chunk
        s.reserve(1, 17)
        s.apply_pending()
        assert s.capacity()[1] == tpc
        s.reserve(1, tpc + 1)  # one more chunk
        s.reserve(1, 5)  # monotone: no-op
        s.apply_pending()
        st = s.stats()
        assert st.pending_jobs == 0
        assert st.reserved_tokens[1] == tpc + 1
        assert st.mapped_tokens[1] == 2 * tpc == s.capacity()[1]
        assert st.chunks_in_use == 2 and st.chunks_created == 2
        assert st.mapped_bytes == 2 * s.chunk_bytes
        assert s.slot_chunks(1) == [0, 1]


def test_capacity_is_capped_at_max_tokens(device):
    with make(device=device, max_tokens=97) as s:
        s.reserve(0, 97)
        s.apply_pending()
        assert s.capacity()[0] == 97


def test_background_mapper_completes_without_apply_pending(device):
    import time

    with make(device=device) as s:
        s.reserve(2, 1000)
        deadline = time.time() + 10
        while s.capacity()[2] < 1000 and time.time() < deadline:
            time.sleep(0.001)
        assert s.capacity()[2] >= 1000
        assert s.stats().pending_jobs == 0


def test_kv_cache_full_carries_numbers_and_changes_nothing(device):
    with make(device=device, max_tokens=5000, budget_chunks=3) as s:
        tpc = s.tokens_per_chunk
        s.reserve(0, 2 * tpc)
        s.apply_pending()  # so the mapper cannot change the snapshot below
        before = s.stats()
        with pytest.raises(KVCacheFull) as e:
            s.reserve(1, 2 * tpc)
        assert isinstance(e.value, RuntimeError)
        assert (e.value.needed_chunks, e.value.available_chunks) == (2, 1)
        assert e.value.chunk_bytes == s.chunk_bytes
        assert e.value.needed_bytes == 2 * s.chunk_bytes
        assert e.value.available_bytes == s.chunk_bytes
        assert "needs 2 more chunks" in str(e.value)
        assert s.stats() == before
        s.reserve(1, tpc)  # what is left still fits


# ---- release / fence / retire ---------------------------------------------------------------


def test_release_waits_for_retire_of_its_fence(device):
    with make(device=device) as s:
        s.fence(0)
        s.reserve(0, 10)
        s.apply_pending()
        s.fence(1)
        s.release(0)
        st = s.stats()
        assert st.draining[0] and st.chunks_in_use == 1 and s.capacity()[0] > 0
        with pytest.raises(ValueError, match="draining"):
            s.reserve(0, 10)
        with pytest.raises(ValueError, match="draining"):
            s.share(0, 1, 0)
        with pytest.raises(ValueError, match="already draining"):
            s.release(0)
        s.retire(0)  # the slot was tagged with fence 1: still draining
        assert s.stats().draining[0]
        s.retire(1)
        st = s.stats()
        assert not st.draining[0] and st.chunks_in_use == 0 and st.chunks_free == 1
        assert s.capacity()[0] == 0 and st.mapped_bytes == 0 and st.reserved_tokens[0] == 0
        s.reserve(0, 10)  # usable again, chunk recycled (LIFO)
        s.apply_pending()
        assert s.slot_chunks(0) == [0] and s.stats().chunks_created == 1


def test_release_after_everything_retired_is_immediate(device):
    with make(device=device) as s:
        s.reserve(0, 10)
        s.release(0)  # no fence ever: nothing was enqueued
        assert s.stats().chunks_in_use == 0
        s.fence(4)
        s.retire(4)
        s.reserve(1, 10)
        s.release(1)  # every enqueued step has retired
        assert not s.stats().draining[1] and s.stats().chunks_free == 1


def test_release_of_unmapped_pending_slot(device):
    with make(device=device) as s:
        s.fence(0)
        s.reserve(3, 4000)
        s.release(3)  # possibly before the mapper ran
        # A step fenced before the release may still read up to the reserved length: the
        # queued extension was mapped, not dropped, and stays mapped until retire.
        st = s.stats()
        assert st.draining[3] and st.pending_jobs == 0 and s.capacity()[3] >= 4000
        assert st.mapped_bytes == st.chunks_in_use * s.chunk_bytes
        s.retire(0)
        st = s.stats()
        assert st.chunks_in_use == 0 and st.pending_jobs == 0 and st.mapped_bytes == 0


def test_fence_and_retire_ordering_errors(device):
    with make(device=device) as s:
        s.fence(3)
        with pytest.raises(ValueError, match="fence: step=2 is below"):
            s.fence(2)
        with pytest.raises(ValueError, match="retire: step=4 is beyond"):
            s.retire(4)
        s.retire(3)
        s.retire(1)  # already retired: no-op
        assert s.stats().retired_step == 3


# ---- share -----------------------------------------------------------------------------------


def test_share_whole_chunks_zero_copy(device):
    with make(device=device, layers=1, kv_heads=1, head_dim=4096, dtype="float32",
              max_tokens=1000) as s:
        tpc = s.tokens_per_chunk  # 64
        assert tpc == 64
        s.reserve(0, 3 * tpc + 5)
        data = write_all(s, 0, [0, 17, tpc - 1, tpc, 2 * tpc + 63, 3 * tpc + 4], "src")
        assert s.share(1, 0, 2 * tpc + 40) == 2 * tpc  # the partial tail is not shared
        s.apply_pending()
        assert s.slot_chunks(1) == s.slot_chunks(0)[:2]
        st = s.stats()
        assert st.chunks_shared == 2 and st.chunks_in_use == 4
        assert st.reserved_tokens[1] == 2 * tpc and s.capacity()[1] == 2 * tpc
        assert_reads(s, 1, {key: val for key, val in data.items() if key[0] < 2 * tpc})
        # A write through one slot shows in the other: same physical memory.
        k, v = token_kv(s, 7)
        s.write_token(1, 5, 0, k, v)
        np.testing.assert_array_equal(s.read_token(0, 5, 0)[0], k)
        # dst grows with fresh chunks; the recomputed tail goes there.
        s.reserve(1, 3 * tpc)
        s.apply_pending()
        assert s.slot_chunks(1)[2] not in s.slot_chunks(0)
        # Releasing src keeps the shared chunks alive for dst.
        s.release(0)
        st = s.stats()
        assert st.chunks_in_use == 3 and st.chunks_shared == 0 and st.chunks_free == 2
        np.testing.assert_array_equal(s.read_token(1, 5, 0)[0], k)
        assert_reads(s, 1, {key: val for key, val in data.items()
                            if key[0] < 2 * tpc and key[0] != 5})


def test_share_less_than_a_chunk_shares_nothing(device):
    with make(device=device) as s:
        s.reserve(0, 100)
        assert s.share(1, 0, 100) == 0
        assert s.slot_chunks(1) == [] and s.stats().chunks_shared == 0


def test_share_from_draining_source(device):
    with make(device=device, layers=1, kv_heads=1, head_dim=4096, dtype="float32") as s:
        s.fence(0)
        s.reserve(0, 64)
        data = write_all(s, 0, [0, 63], "d")
        s.release(0)
        assert s.share(2, 0, 64) == 64
        s.retire(0)
        assert s.stats().chunks_in_use == 1
        assert_reads(s, 2, data)


# ---- data integrity --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_data_survives_growth_release_retire_and_reuse(dtype, device):
    with make(device=device, layers=3, kv_heads=1, head_dim=128, dtype=dtype, slots=4,
              max_tokens=20000, budget_chunks=12) as s:
        tpc = s.tokens_per_chunk
        s.fence(0)
        s.reserve(0, 17)
        s.reserve(1, tpc + 1)
        d0 = write_all(s, 0, [0, 1, 16], "a")
        write_all(s, 1, [0, tpc - 1, tpc], "b")
        s.reserve(0, 3 * tpc + 1)  # grow slot 0 after other slots took chunks
        s.reserve(2, 2 * tpc)
        d0.update(write_all(s, 0, [tpc, 2 * tpc + 5, 3 * tpc], "c"))
        d2 = write_all(s, 2, [0, 2 * tpc - 1], "d")
        s.fence(1)
        s.release(1)
        s.retire(1)
        s.reserve(3, 2 * tpc)  # recycles slot 1's chunks
        write_all(s, 3, [0, tpc - 1, tpc, 2 * tpc - 1], "e")
        assert_reads(s, 0, d0)
        assert_reads(s, 2, d2)
        assert s.stats().chunks_created <= s.budget_chunks


def test_80_layer_single_head_chunks(device):
    with KVStore(80, 1, 128, "bfloat16", 2, 1000, 30 * MiB, device) as s:
        assert s.chunk_bytes == 10 * MiB and s.tokens_per_chunk == 256
        s.reserve(0, 257)
        s.reserve(1, 256)
        data = write_all(s, 0, [0, 255, 256], "x")
        with pytest.raises(KVCacheFull):
            s.reserve(1, 257)
        assert_reads(s, 0, data)


# ---- swap out / swap in ----------------------------------------------------------------------


def test_swap_out_and_in_round_trip_across_a_chunk_boundary(device):
    with make(device=device, layers=2, kv_heads=16, head_dim=128, dtype="bfloat16", slots=4,
              max_tokens=1000, budget_chunks=8) as s:
        tpc = s.tokens_per_chunk
        n = tpc + 37  # two chunks, the second one partly used
        s.fence(0)
        s.reserve(0, n + 5)
        s.reserve(1, 1)
        data = write_all(s, 0, range(n), "swap")
        out = s.swap_out(0, n)
        # The layout by hand: token-major, each token's layers in order, K then V.
        want = np.concatenate([np.stack(data[pos, layer]).view(np.uint8).ravel()
                               for pos in range(n) for layer in range(s.layers)])
        assert out.dtype == np.uint8 and out.shape == (n * s.token_bytes,)
        np.testing.assert_array_equal(out, want)

        chunks = s.slot_chunks(0)
        s.release(0)
        s.retire(0)
        s.reserve(3, n + 1)
        assert s.slot_chunks(3) == chunks[::-1]  # the same chunks, now in the other order
        write_all(s, 3, [0, tpc - 1, tpc, n - 1], "garbage")
        after = write_all(s, 3, [n], "after")  # beyond the swapped tokens: left alone
        out.setflags(write=False)  # swap_in only reads
        s.swap_in(3, out)
        assert_reads(s, 3, data)
        assert_reads(s, 3, after)
        np.testing.assert_array_equal(s.swap_out(3, n), want)
        assert s.swap_out(3, 0).shape == (0,)
        s.swap_in(3, s.swap_out(3, 0))  # nothing to copy


def test_swap_bad_calls(device):
    with make(device=device, max_tokens=5000) as s:
        tpc = s.tokens_per_chunk
        s.reserve(0, 10)  # pending mappings are applied by the swap calls
        assert s.swap_out(0, tpc).nbytes == tpc * s.token_bytes
        with pytest.raises(ValueError, match=rf"swap_out: n_tokens={tpc + 1} out of range "
                                             rf"\[0, {tpc}\] \(the mapped capacity of slot 0\)"):
            s.swap_out(0, tpc + 1)
        with pytest.raises(ValueError, match=r"swap_out: n_tokens=1 out of range \[0, 0\]"):
            s.swap_out(1, 1)
        with pytest.raises(ValueError, match=r"n_tokens=-1 must be an int in \[0, 5000\]"):
            s.swap_out(0, -1)
        with pytest.raises(ValueError, match=r"n_tokens=5001 must be an int"):
            s.swap_out(0, 5001)
        with pytest.raises(ValueError, match=r"slot=4 out of range \[0, 3\]"):
            s.swap_out(4, 0)
        one = s.swap_out(0, 1)
        with pytest.raises(ValueError, match=r"slot=-1 out of range"):
            s.swap_in(-1, one)
        with pytest.raises(ValueError, match=r"swap_in: n_tokens=1 out of range \[0, 0\]"):
            s.swap_in(2, one)
        with pytest.raises(ValueError, match=rf"swap_in: n_tokens={tpc + 1} out of range"):
            s.swap_in(0, np.zeros((tpc + 1) * s.token_bytes, np.uint8))
        with pytest.raises(ValueError, match="not a multiple of token_bytes"):
            s.swap_in(0, one[:-1])
        for bad in (one.view(np.float32), one.reshape(2, -1), bytes(one), list(one)):
            with pytest.raises(ValueError, match="1-D uint8 numpy array"):
                s.swap_in(0, bad)


# ---- error flag and registry ----------------------------------------------------------------


def test_check_raises_on_error_flag():
    with make() as s:
        s.check()
        ctypes.c_int32.from_address(s.error_flag_ptr).value = 3
        with pytest.raises(KVCapacityError, match="capacity"):
            s.check()
        assert s.take_error() == 0
        s.check()


def test_registry_and_close(device):
    s = make(device=device)
    t = make(device=device)
    assert s.store_id != t.store_id
    assert _native._store_registered(s.store_id)
    sid = s.store_id
    s.close()
    assert not _native._store_registered(sid)
    with pytest.raises(RuntimeError, match="closed"):
        s.reserve(0, 1)
    s.close()  # idempotent
    with t:
        assert _native._store_registered(t.store_id)
    assert jvt.KVStore is KVStore and jvt.KVCacheFull is KVCacheFull


def test_cuda_unavailable_is_clear():
    if cuda_available():
        pytest.skip("a CUDA driver and device are present")
    with pytest.raises(RuntimeError, match="CUDA backend unavailable"):
        make(device="cuda:0")


# ---- error paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layers": 0}, "layers=0 out of range"),
        ({"kv_heads": -1}, "kv_heads=-1 out of range"),
        ({"head_dim": 0}, "head_dim=0 out of range"),
        ({"slots": 0}, "slots=0 out of range"),
        ({"max_tokens": 0}, "max_tokens=0 out of range"),
        ({"dtype": "int8"}, "dtype='int8' not supported"),
        ({"dtype": np.int32}, "dtype=int32 not supported"),
        ({"device": "tpu"}, "device='tpu' not understood"),
        ({"device": "cuda:x"}, "not understood"),
        ({"budget_chunks": 0}, "holds no chunk"),
        ({"slots": 1 << 20, "max_tokens": (1 << 31) - 1}, "reservation would be"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_chunk_too_large():
    with pytest.raises(ValueError, match="exceeds 1 GiB"):
        KVStore(97, 1, 127, "bfloat16", 1, 10, 1 << 40)


def test_bad_calls(device):
    with make(device=device, max_tokens=1000) as s:
        with pytest.raises(ValueError, match=r"slot=4 out of range \[0, 3\]"):
            s.reserve(4, 1)
        with pytest.raises(ValueError, match=r"slot=-1 out of range"):
            s.release(-1)
        with pytest.raises(ValueError, match=r"n_tokens=1001 out of range \[0, 1000\]"):
            s.reserve(0, 1001)
        with pytest.raises(ValueError, match=r"n_tokens=-1 out of range"):
            s.reserve(0, -1)
        s.reserve(0, 100)
        s.reserve(1, 10)
        with pytest.raises(ValueError, match="dst slot 1 is not empty"):
            s.share(1, 0, 100)
        with pytest.raises(ValueError, match="same slot"):
            s.share(0, 0, 10)
        with pytest.raises(ValueError, match=r"n_tokens=101 out of range \[0, 100\]"):
            s.share(2, 0, 101)
        with pytest.raises(ValueError, match="dst=9 out of range"):
            s.share(9, 0, 1)
        with pytest.raises(ValueError, match="src=9 out of range"):
            s.share(2, 9, 1)
        k, v = token_kv(s, 0)
        with pytest.raises(ValueError, match=r"pos=1000 out of range \[0, 1000\)"):
            s.write_token(0, 1000, 0, k, v)
        with pytest.raises(ValueError, match=r"pos=0 out of range \[0, 0\)"):
            s.read_token(3, 0, 0)
        with pytest.raises(ValueError, match=r"layer=2 out of range \[0, 1\]"):
            s.read_token(0, 0, 2)
        with pytest.raises(ValueError, match=r"k has shape \(2, 63\)"):
            s.write_token(0, 0, 0, k[:, :63], v)


def test_concurrent_apply_pending_while_slots_churn(device):
    """An FFI-like thread calls apply_pending nonstop while the engine thread reserves, shares,
    releases and retires; every reserved slot is mapped whenever apply_pending has returned."""
    import threading

    with make(device=device, slots=6, max_tokens=4096, budget_chunks=12) as s:
        tpc = s.tokens_per_chunk
        stop = threading.Event()
        errors = []

        def handler():
            try:
                while not stop.is_set():
                    s.apply_pending()
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        t = threading.Thread(target=handler)
        t.start()
        try:
            rng = np.random.default_rng(0)
            for step in range(400):
                s.fence(step)
                slot = int(rng.integers(6))
                st = s.stats()
                if st.draining[slot]:
                    continue
                if st.reserved_tokens[slot] and rng.random() < 0.4:
                    s.release(slot)
                elif not st.reserved_tokens[slot] and rng.random() < 0.3:
                    src = int(rng.integers(6))
                    if src != slot and not st.draining[src]:
                        s.share(slot, src, st.reserved_tokens[src])
                else:
                    try:
                        s.reserve(slot, int(rng.integers(1, 4 * tpc)))
                    except KVCacheFull:
                        pass
                s.apply_pending()
                st = s.stats()
                for i in range(6):
                    if not st.draining[i]:
                        assert st.mapped_tokens[i] >= st.reserved_tokens[i]
                s.retire(max(step - 2, -1))
        finally:
            stop.set()
            t.join()
        assert not errors
        for slot in range(6):
            if not s.stats().draining[slot]:
                s.release(slot)
        s.fence(1000)
        s.retire(1000)
        st = s.stats()
        assert st.chunks_in_use == 0 and st.chunks_free == st.chunks_created

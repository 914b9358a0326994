"""The KV store on CUDA VMM (device="cuda:0"); skipped where JAX sees no GPU.

The host-backend behaviour tests and the state machine are re-collected here with the CUDA
backend; on top: device memory moves by exactly chunk_bytes per newly created chunk and not at
all for recycled ones, and 100k reserve/release/retire cycles do not grow device memory.
"""

import pytest
from hypothesis import settings
from test_kv_stateful import KVStoreMachine
from test_kv_store import (  # noqa: F401 - re-collected with the fixture `device` below
    test_80_layer_single_head_chunks,
    test_background_mapper_completes_without_apply_pending,
    test_bad_calls,
    test_capacity_is_capped_at_max_tokens,
    test_data_survives_growth_release_retire_and_reuse,
    test_fence_and_retire_ordering_errors,
    test_kv_cache_full_carries_numbers_and_changes_nothing,
    test_registry_and_close,
    test_release_after_everything_retired_is_immediate,
    test_release_of_unmapped_pending_slot,
    test_release_waits_for_retire_of_its_fence,
    test_reserve_maps_in_background_and_capacity_follows,
    test_share_from_draining_source,
    test_share_less_than_a_chunk_shares_nothing,
    test_share_whole_chunks_zero_copy,
    test_swap_bad_calls,
    test_swap_out_and_in_round_trip_across_a_chunk_boundary,
)

from jvt import _native
from jvt.kv import KVStore, cuda_available

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.fixture
def device():
    import jax

    # JAX first: it creates the primary context (and its memory pool) the store then shares.
    assert any(d.platform == "gpu" for d in jax.devices())
    assert cuda_available(), _native.cuda_status()
    return "cuda:0"


def free_device_bytes() -> int:
    """cuMemGetInfo's free bytes on device 0 (cuda-python when installed, else jvt's binding)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return _native._cuda_mem_info(0)[0]
    (err,) = driver.cuInit(0)
    assert err == driver.CUresult.CUDA_SUCCESS, err
    err, dev = driver.cuDeviceGet(0)
    assert err == driver.CUresult.CUDA_SUCCESS, err
    err, ctx = driver.cuDevicePrimaryCtxRetain(dev)
    assert err == driver.CUresult.CUDA_SUCCESS, err
    try:
        (err,) = driver.cuCtxSetCurrent(ctx)
        assert err == driver.CUresult.CUDA_SUCCESS, err
        err, free, _ = driver.cuMemGetInfo()
        assert err == driver.CUresult.CUDA_SUCCESS, err
        return int(free)
    finally:
        driver.cuDevicePrimaryCtxRelease(dev)


def store(device, budget_chunks=64, slots=4, max_tokens=64 * 32):
    # 32 KiB tokens: 64 tokens per 2 MiB chunk.
    return KVStore(1, 1, 4096, "float32", slots, max_tokens, budget_chunks * 2 * MiB, device)


class CudaKVStoreMachine(KVStoreMachine):
    DEVICE = "cuda:0"


TestCudaKVStoreMachine = CudaKVStoreMachine.TestCase
TestCudaKVStoreMachine.settings = settings(max_examples=40, stateful_step_count=30,
                                           deadline=None)


def test_cuda_layout_and_pointers(device):
    with store(device) as s:
        assert s.chunk_bytes == 2 * MiB  # cuMemGetAllocationGranularity on H100/H200
        assert s.base % s.chunk_bytes == 0
        assert s.capacity_table_ptr != 0 and s.error_flag_ptr != 0
        assert s.take_error() == 0
        s.check()


def test_bad_device_index(device):
    with pytest.raises(ValueError, match="out of range"):
        store("cuda:999")


def test_device_memory_moves_by_chunk_bytes(device):
    with store(device) as s:
        s.reserve(3, 1)  # first chunk: lets the driver set up whatever it sets up once
        s.apply_pending()
        free0 = free_device_bytes()
        s.reserve(0, 64 * 16)  # 16 new chunks
        s.apply_pending()
        free1 = free_device_bytes()
        assert s.stats().chunks_created == 17
        assert abs((free0 - free1) - 16 * s.chunk_bytes) <= 2 * MiB, (free0, free1)
        s.fence(0)
        s.release(0)
        s.retire(0)
        assert abs(free_device_bytes() - free1) <= 2 * MiB  # the pool keeps its chunks
        s.reserve(1, 64 * 16)  # recycled: no new physical memory
        s.apply_pending()
        assert s.stats().chunks_created == 17
        assert abs(free_device_bytes() - free1) <= 2 * MiB
        s.reserve(2, 64 * 8)  # 8 more new chunks
        s.apply_pending()
        assert abs((free1 - free_device_bytes()) - 8 * s.chunk_bytes) <= 2 * MiB
    assert abs(free_device_bytes() - free0) <= 4 * MiB  # all of it back at close


def test_reserve_release_retire_soak_does_not_grow(device):
    with store(device, budget_chunks=8, slots=2) as s:
        for step in range(100):  # warm up the pool and the driver's page tables
            s.fence(step)
            s.reserve(step % 2, 64 * 3)
            s.release(step % 2)
            s.retire(step)
        s.apply_pending()
        free0 = free_device_bytes()
        created = s.stats().chunks_created
        for step in range(100, 100_100):
            s.fence(step)
            s.reserve(step % 2, 64 * (1 + step % 3))
            if step % 2 == 0:  # map (and so unmap) on this thread; else racing the mapper
                s.apply_pending()
            s.release(step % 2)
            s.retire(step)
        st = s.stats()
        assert st.chunks_created == created <= 8
        assert st.chunks_in_use == 0 and st.mapped_bytes == 0
        assert abs(free_device_bytes() - free0) <= 2 * MiB

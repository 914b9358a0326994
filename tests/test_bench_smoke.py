"""Fast CPU checks of the benchmark suite's pure parts: the KV memory simulator against hand
computed numbers and the synthetic workload's determinism and distributions."""

import math

import numpy as np
import pytest

from bench import memory, workload
from bench.memory import KVShape, MiB

LLAMA3_8B = KVShape(layers=32, kv_heads=8, head_dim=128)  # 128 KiB per token
LLAMA32_1B = KVShape(layers=16, kv_heads=8, head_dim=64)  # 32 KiB per token


def test_shapes_by_hand():
    assert LLAMA3_8B.token_bytes == 131072
    assert LLAMA3_8B.chunk_bytes == 2 * MiB and LLAMA3_8B.tokens_per_chunk == 16
    assert LLAMA32_1B.token_bytes == 32768 and LLAMA32_1B.tokens_per_chunk == 64
    # 3 layers x 2 x 1 head x 64 x 2 B = 768 B = 2^8 * 3 -> chunk lcm(2^21, 768) = 6 MiB.
    odd = KVShape(layers=3, kv_heads=1, head_dim=64)
    assert odd.token_bytes == 768 and odd.chunk_bytes == 6 * MiB
    assert odd.tokens_per_chunk == 8192


@pytest.mark.parametrize("length, live, paged, jvt, per_layer", [
    # 8B: 128 KiB/token, 16 tokens per 2 MiB chunk, 2 KiB per token per layer buffer.
    (1, 128 * 1024, 2 * MiB, 2 * MiB, 64 * 2 * MiB),
    (16, 2 * MiB, 2 * MiB, 2 * MiB, 64 * 2 * MiB),
    (17, 17 * 128 * 1024, 4 * MiB, 4 * MiB, 64 * 2 * MiB),
    (97, 97 * 128 * 1024, 7 * 2 * MiB, 7 * 2 * MiB, 64 * 2 * MiB),
    (1024, 128 * MiB, 128 * MiB, 128 * MiB, 64 * 2 * MiB),
    (1025, 1025 * 128 * 1024, 65 * 2 * MiB, 65 * 2 * MiB, 64 * 4 * MiB),
])
def test_seq_bytes_llama3_8b(length, live, paged, jvt, per_layer):
    assert memory.seq_bytes("live", length, LLAMA3_8B) == live
    assert memory.seq_bytes("paged16", length, LLAMA3_8B) == paged
    assert memory.seq_bytes("jvt", length, LLAMA3_8B) == jvt
    assert memory.seq_bytes("per_layer", length, LLAMA3_8B) == per_layer
    assert memory.seq_bytes("static", length, LLAMA3_8B, max_len=4096) == 512 * MiB


def test_seq_bytes_1b_chunk_coarser_than_paged():
    # 1B: 64 tokens per chunk, so 17 tokens take one 2 MiB chunk but two 16-token blocks (1 MiB).
    assert memory.seq_bytes("jvt", 17, LLAMA32_1B) == 2 * MiB
    assert memory.seq_bytes("paged16", 17, LLAMA32_1B) == 32 * 32768
    assert memory.seq_bytes("per_layer", 17, LLAMA32_1B) == 32 * 2 * MiB


def test_timeline_and_static():
    trace = [[0, 0], [17, 0], [18, 1]]
    tl = memory.timeline(trace, LLAMA3_8B, slots=2, max_len=4096)
    assert tl["static"] == [1024 * MiB] * 3
    assert tl["live"] == [0, 17 * 131072, 19 * 131072]
    assert tl["jvt"] == [0, 4 * MiB, 6 * MiB]
    assert tl["paged16"] == [0, 4 * MiB, 6 * MiB]
    assert tl["per_layer"] == [0, 128 * MiB, 256 * MiB]
    with pytest.raises(ValueError, match="exceed slots"):
        memory.step_bytes([1, 2, 3], LLAMA3_8B, slots=2, max_len=16)


def test_max_concurrent_by_hand():
    budget = 40 * 1024 * MiB  # 40 GiB = 20480 chunks of 2 MiB
    assert memory.max_concurrent("static", 17, budget, LLAMA3_8B, max_len=4096) == 80
    assert memory.max_concurrent("per_layer", 17, budget, LLAMA3_8B) == 320
    assert memory.max_concurrent("jvt", 17, budget, LLAMA3_8B) == 10240
    assert memory.max_concurrent("paged16", 17, budget, LLAMA3_8B) == 10240
    assert memory.max_concurrent("live", 17, budget, LLAMA3_8B) == 327680 // 17
    # A budget that is not a whole number of units: 5 MiB -> 2 chunks -> 1 sequence of 17.
    assert memory.max_concurrent("jvt", 17, 5 * MiB, LLAMA3_8B) == 1
    with pytest.raises(ValueError, match="unknown scheme"):
        memory.max_concurrent("buddy", 17, budget, LLAMA3_8B)


def test_workload_deterministic_and_documented():
    a = workload.sharegpt_like(300, rate=4.0, seed=7)
    b = workload.sharegpt_like(300, rate=4.0, seed=7)
    c = workload.sharegpt_like(300, rate=4.0, seed=8)
    assert a == b and a != c
    assert all(len(r.prompt) == r.prompt_len for r in a)
    assert a[0].arrival_s == 0.0
    arrivals = np.array([r.arrival_s for r in a])
    assert np.all(np.diff(arrivals) >= 0)
    # Poisson with rate 4: mean gap 0.25 s (300 samples: +-5 standard errors).
    assert abs(np.mean(np.diff(arrivals)) - 0.25) < 5 * 0.25 / math.sqrt(299)
    prompts = np.array([r.prompt_len for r in a])
    assert prompts.min() >= 4 and prompts.max() <= 1024
    assert 60 < np.median(prompts) < 160  # lognormal median 98
    offline = workload.sharegpt_like(5, rate=math.inf, seed=0)
    assert [r.arrival_s for r in offline] == [0.0] * 5


def test_conversations_deterministic():
    a = workload.conversations(3, turns=8, seed=1)
    assert a == workload.conversations(3, turns=8, seed=1)
    assert len(a) == 3 and all(len(c) == 8 for c in a)
    with pytest.raises(ValueError):
        workload.sharegpt_like(1, rate=0.0)

"""Tensor parallelism on fake CPU devices (conftest: --xla_force_host_platform_device_count=4):
greedy outputs identical for tensor_parallel = 1, 2, 4; each device's store holds its 1/N of
the KV; exactly two all-reduces per layer in the compiled step; sessions, prefix sharing and
swap preemption with N > 1; bad settings rejected with the limit named."""

from __future__ import annotations

import re

import jax
import pytest

import jvt
from jvt import models
from jvt.models import ModelConfig, load, save_hf_checkpoint
from jvt.types import SamplingParams

pytestmark = pytest.mark.skipif(len(jax.devices("cpu")) < 4,
                                reason="needs 4 CPU devices (XLA_FLAGS, see conftest.py)")

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "token_buckets": (16, 64),
          "seq_buckets": (1, 4), "prefill_chunk": 24}
# Odd sizes: vocabulary 304 (the LM head splits 2 and 4 ways), hidden 72, intermediate 100,
# 4 query heads of 8 dims over 2 KV heads (replicated at tensor_parallel=4), q/k/v biases.
ODD = ModelConfig(vocab_size=304, hidden_size=72, intermediate_size=100, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                  max_position_embeddings=512, dtype="float32", bos_token_id=256,
                  eos_token_id=257)


def _prompts(tokenizer):
    texts = ["Tensor parallel", "The quick brown fox jumps over the lazy dog. " * 2, "x"]
    return [tokenizer.encode(t, add_bos=True) for t in texts]


def _generate(model, n, prompts, params=GREEDY, **options):
    engine = jvt.Engine(model, tensor_parallel=n, **{**ENGINE, **options})
    try:
        return [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)], \
            engine.stats()
    finally:
        engine.close()


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("odd")
    save_hf_checkpoint(models.Model(ODD, models.init_module(ODD, seed=8),
                                    models.ByteTokenizer()), path)
    return load(str(path), use_cache=False)


@pytest.mark.parametrize("name", ["tiny", "odd-checkpoint"])
def test_greedy_outputs_identical_for_1_2_4_devices(name, odd_checkpoint):
    model = load("tiny", seed=2) if name == "tiny" else odd_checkpoint
    prompts = _prompts(model.tokenizer)
    outs = {n: _generate(model, n, prompts)[0] for n in (1, 2, 4)}
    assert outs[1] == outs[2] == outs[4]
    assert all(len(o) == GREEDY.max_tokens for o in outs[1])


def test_each_device_store_holds_its_share_of_the_kv(odd_checkpoint):
    prompts = _prompts(odd_checkpoint.tokenizer)
    stats = {n: _generate(odd_checkpoint, n, prompts)[1] for n in (1, 2)}
    one, two = stats[1], stats[2]
    assert two["tensor_parallel"] == 2 and len(two["kv_per_device"]) == 2
    per_device = [d["kv_used_bytes"] for d in two["kv_per_device"]]
    assert per_device[0] == per_device[1] == one["kv_used_bytes"] // 2
    assert sum(per_device) == two["kv_used_bytes"] == one["kv_used_bytes"]
    assert two["kv_mapped_bytes"] == sum(d["kv_mapped_bytes"] for d in two["kv_per_device"])


def test_replicated_kv_heads_at_four_devices(odd_checkpoint):
    """2 KV heads over 4 devices: each device stores one (replicated) KV head, so the
    cache costs twice the single-device bytes."""
    engine = jvt.Engine(odd_checkpoint, tensor_parallel=4, **ENGINE)
    try:
        assert [s.kv_heads for s in engine.store.stores] == [1, 1, 1, 1]
        single = odd_checkpoint.config.num_layers * 2 * 2 * 8 * 4
        assert engine.store.token_bytes == 2 * single
    finally:
        engine.close()


@pytest.mark.parametrize("n", [2, 4])
def test_two_all_reduces_per_layer_in_the_compiled_step(n):
    model = load("tiny")
    engine = jvt.Engine(model, tensor_parallel=n, **ENGINE)
    try:
        for key, step in engine.runner.compiled.items():
            hlo = step.as_text()
            reduces = re.findall(r"= \S+ all-reduce\(", hlo)
            assert len(reduces) == 2 * model.config.num_layers, key
            assert "all-gather" not in hlo  # vocabulary 263: LM head replicated
    finally:
        engine.close()


def test_vocab_split_lm_head_gathers_instead_of_reducing(odd_checkpoint):
    engine = jvt.Engine(odd_checkpoint, tensor_parallel=2, **ENGINE)
    try:
        assert engine.runner.split_vocab
        hlo = next(iter(engine.runner.compiled.values())).as_text()
        assert len(re.findall(r"= \S+ all-reduce\(", hlo)) == 2 * ODD.num_layers
        assert re.search(r"= \S+ all-gather\(", hlo)
    finally:
        engine.close()


# Wide KV (16 heads of 128 floats, 2 layers): a 2 MiB chunk holds 64 tokens on one device and
# 128 at tensor_parallel=2, so sharing and memory pressure happen at CPU-friendly lengths.
WIDE = ModelConfig(vocab_size=263, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=16, num_kv_heads=16, head_dim=128, max_position_embeddings=1024,
                   dtype="float32", bos_token_id=256, eos_token_id=(257, 262))


def test_sessions_prefix_sharing_and_swap_preemption_with_two_devices():
    """The same workload at tensor_parallel 1 and 2: a shared 300-token prefix (whole chunks
    on every device), a 20 MiB budget that forces swap preemption, then a session: identical
    outputs; every chunk returned."""
    model = models.Model(WIDE, models.init_module(WIDE, seed=5), models.ByteTokenizer())
    shared = [(7 * i) % 256 for i in range(300)]
    prompts = [shared + [i] * (i + 3) for i in range(6)]

    def run(n):
        engine = jvt.Engine(model, tensor_parallel=n, max_model_len=512,
                            kv_budget_bytes=20 << 20, **ENGINE)
        try:
            results = engine.generate(prompts, GREEDY, use_tqdm=False)
            outs = [o.token_ids for o in results]
            stats = {**engine.stats(),
                     "reused": sum(o.metrics.prefix_tokens_reused for o in results)}
            with engine.session(system="be brief") as chat:
                turns = [chat.send(m, GREEDY).token_ids for m in ("hi", "and again")]
            engine.free_cache()
            assert engine.stats()["chunks_in_use"] == 0
            return outs, turns, stats
        finally:
            engine.close()

    one, two = run(1), run(2)
    assert one[0] == two[0] and one[1] == two[1]
    for stats in (one[2], two[2]):
        assert stats["preemptions"] > 0 and stats["swaps"] > 0
        assert stats["reused"] >= 256  # the shared prefix's whole chunks, mapped not recomputed


@pytest.mark.parametrize("config, n, match", [
    (None, 3, "must divide num_heads=4"),
    (None, 8, "needs 8 CPU devices"),
    (None, 0, "tensor_parallel must be a positive int"),
    (ModelConfig(vocab_size=263, hidden_size=48, intermediate_size=64, num_layers=1,
                 num_heads=6, num_kv_heads=3, head_dim=8, dtype="float32"), 2,
     "num_kv_heads=3 must divide one another"),
    (ModelConfig(vocab_size=263, hidden_size=48, intermediate_size=66, num_layers=1,
                 num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32"), 4,
     "must divide intermediate_size=66"),
])
def test_bad_settings_name_the_limit(config, n, match):
    model = load("tiny") if config is None else models.Model(
        config, models.init_module(config), models.ByteTokenizer())
    with pytest.raises(ValueError, match=match):
        jvt.Engine(model, tensor_parallel=n, **ENGINE)

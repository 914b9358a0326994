"""Tensor parallelism on two GPUs (bf16): tensor_parallel=2 against 1 on the llama-3.2-1b and
llama-3-8b head layouts (fewer layers, to keep the run short), and each GPU's store holding
half the KV. Skipped with fewer than two GPUs.

bf16 tie rule (tests/test_engine_gpu.py): the row-parallel projections sum two bf16 partial
products with an all-reduce where one device sums inside one GEMM, so logits differ by
rounding; greedy tokens must agree up to the first near-tie.
"""

import dataclasses

import jax
import pytest

import jvt
from jvt import models
from jvt.types import SamplingParams
from tests.test_engine_gpu import assert_equal_up_to_ties

pytestmark = pytest.mark.gpu

PARAMS = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)
ENGINE = {"device": "cuda", "max_num_seqs": 8, "max_model_len": 2048,
          "max_num_batched_tokens": 512, "token_buckets": (512,), "seq_buckets": (8,),
          "decode_shapes": False}


def _gpus() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def _model(preset: str, layers: int) -> models.Model:
    config = dataclasses.replace(models.preset_config(preset), num_layers=layers)
    return models.Model(config, models.init_module(config, seed=3), models.ByteTokenizer())


def _prompts():
    return [[(17 * i + 5 * j) % 256 for j in range(40 + 37 * i)] for i in range(6)]


@pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("preset, layers", [("llama-3.2-1b", 4), ("llama-3-8b", 2)])
def test_two_gpus_give_the_single_gpu_tokens_and_half_the_kv_each(preset, layers):
    model = _model(preset, layers)
    outs, stats = {}, {}
    for n in (1, 2):
        engine = jvt.Engine(model, tensor_parallel=n, **ENGINE)
        try:
            outs[n] = engine.generate(_prompts(), PARAMS, use_tqdm=False)
            stats[n] = engine.stats()
        finally:
            engine.close()
    for one, two in zip(outs[1], outs[2]):
        assert_equal_up_to_ties(one, two)
    per_device = [d["kv_used_bytes"] for d in stats[2]["kv_per_device"]]
    assert per_device[0] == per_device[1] == stats[1]["kv_used_bytes"] // 2
    assert [d["device"] for d in stats[2]["kv_per_device"]] == [str(d) for d in
                                                                jax.devices("gpu")[:2]]

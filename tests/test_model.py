"""The LLaMA-family NNX model against Hugging Face transformers (PyTorch, fp32) on tiny random
checkpoints of each family, through the real KV store and jvt_attention op on the CPU; the
module's structure (Params, dtypes, sharding axes, parameter counts); the module called
directly against the engine."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import FAMILIES, VOCAB, build_hf_model, hf_logits, save_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

import jvt
from jvt.models import llama, load, preset_config, save_hf_checkpoint
from jvt.models.loader import hf_config_dict
from jvt.types import AttnMeta

FP32_TOL = 1e-4  # max |ours - ref| / max |ref| against the transformers fp32 forward


@functools.partial(jax.jit, static_argnames=("graphdef", "store_id"))
def _step_logits(graphdef, state, tokens, meta, *, store_id):
    module = nnx.merge(graphdef, state)
    return module.logits(module(tokens, meta, store_id=store_id))


def _store(config, slots=3, max_tokens=128):
    return jvt.KVStore(layers=config.num_layers, kv_heads=config.num_kv_heads,
                       head_dim=config.head_dim, dtype=config.dtype, slots=slots,
                       max_tokens=max_tokens, budget_bytes=64 << 20)


def run_step(model, store, seqs, pad=0):
    """One packed step. seqs: [(slot, tokens, start)] where tokens take positions
    start.. of slot (an entry without tokens may have slot -1). Returns (per-sequence logits
    [n_i, vocab], padding-row logits)."""
    tokens, positions, starts, slots, lens = [], [], [0], [], []
    for slot, toks, start in seqs:
        tokens += toks
        positions += range(start, start + len(toks))
        starts.append(len(tokens))
        slots.append(slot)
        lens.append(start + len(toks))
        if toks:
            store.reserve(slot, start + len(toks))
    tokens += [0] * pad
    positions += [0] * pad
    meta = AttnMeta(*(jnp.asarray(x, jnp.int32) for x in (positions, starts, slots, lens)))
    graphdef, state = nnx.split(model.module)
    out = np.asarray(_step_logits(graphdef, state, jnp.asarray(tokens, jnp.int32), meta,
                                  store_id=store.store_id))
    store.check()
    return [out[a:b] for a, b in itertools.pairwise(starts)], out[starts[-1]:]


def rel_err(x, ref):
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (fp32 transformers model, its saved checkpoint dir), built once."""
    out = {}
    for family in FAMILIES:
        model = build_hf_model(family)
        path = tmp_path_factory.mktemp(family.replace(".", "_"))
        save_hf_model(model, path)
        out[family] = (model, path)
    return out


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_matches_transformers(family, checkpoints):
    """A packed step of three sequences (17, 1 and 6 tokens) and 3 padding rows."""
    hf_model, path = checkpoints[family]
    model = load(str(path), use_cache=False)
    seqs = [(0, _tokens(17, 1), 0), (2, _tokens(1, 2), 0), (1, _tokens(6, 3), 0)]
    with _store(model.config) as store:
        outs, pad_rows = run_step(model, store, seqs, pad=3)
    errs = [rel_err(out, hf_logits(hf_model, toks)) for out, (_, toks, _) in zip(outs, seqs)]
    print(f"{family}: prefill logits max relative error vs transformers fp32: {max(errs):.2e}")
    assert max(errs) <= FP32_TOL
    assert pad_rows.shape == (3, VOCAB) and np.isfinite(pad_rows).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_matches_full_forward(family, checkpoints):
    """Prefill 7, a 5-token chunk continuing the cached prefix, then 8 single-token decode
    steps (slot 0) give the logits of one 20-token forward (slot 1) and of transformers."""
    hf_model, path = checkpoints[family]
    model = load(str(path), use_cache=False)
    toks = _tokens(20, 4)
    with _store(model.config) as store:
        parts = [run_step(model, store, [(0, toks[:7], 0)])[0][0],
                 run_step(model, store, [(0, toks[7:12], 7)])[0][0]]
        for pos in range(12, 20):
            parts.append(run_step(model, store, [(0, [toks[pos]], pos)], pad=1)[0][0])
        full = run_step(model, store, [(1, toks, 0)])[0][0]
    cached = np.concatenate(parts)
    err_full, err_hf = rel_err(cached, full), rel_err(cached, hf_logits(hf_model, toks))
    print(f"{family}: cached decode vs full forward {err_full:.2e}, vs transformers {err_hf:.2e}")
    assert err_full <= 1e-5
    assert err_hf <= FP32_TOL


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_mixed_steps_match_transformers(data, checkpoints):
    """Two sequences advance together in steps of one fixed shape (T=16, S=2): random
    prefill chunks and single-token decodes side by side, idle entries (slot -1) and padding;
    every row's logits equal transformers' for that sequence."""
    hf_model, path = checkpoints["llama3"]
    model = load(str(path), use_cache=False)
    lengths = [data.draw(st.integers(1, 24), label=f"len{i}") for i in range(2)]
    toks = [_tokens(n, 10 + i) for i, n in enumerate(lengths)]
    done, outs = [0, 0], [[], []]
    with _store(model.config) as store:
        while done != lengths:
            sizes = [min(lengths[i] - done[i], data.draw(st.integers(0, 8), label="chunk"))
                     for i in range(2)]
            if not any(sizes):  # every step advances some sequence
                first = 0 if done[0] < lengths[0] else 1
                sizes[first] = 1
            seqs = [(i if n else -1, toks[i][done[i]:done[i] + n], done[i])
                    for i, n in enumerate(sizes)]
            rows, _ = run_step(model, store, seqs, pad=16 - sum(len(t) for _, t, _ in seqs))
            for i, (_, chunk, _) in enumerate(seqs):
                outs[i].append(rows[i])
                done[i] += len(chunk)
    for i in range(2):
        assert rel_err(np.concatenate(outs[i]), hf_logits(hf_model, toks[i])) <= FP32_TOL


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint(saved, tmp_path):
    """bf16/f16 weights load exactly (run in fp32 they match transformers on the same
    rounded weights) and run natively in their own dtype within half-precision error."""
    hf_model = build_hf_model("llama3", seed=5)
    save_hf_model(hf_model, tmp_path, dtype=saved)
    toks = _tokens(23, 6)
    ref = hf_logits(hf_model, toks)
    exact = load(str(tmp_path), dtype="float32", use_cache=False)
    native = load(str(tmp_path), use_cache=False)
    assert native.config.dtype == str(saved).removeprefix("torch.")
    with _store(exact.config) as store:
        err_exact = rel_err(run_step(exact, store, [(0, toks, 0)])[0][0], ref)
    with _store(native.config) as store:
        err_native = rel_err(run_step(native, store, [(0, toks, 0)])[0][0], ref)
    print(f"{saved} checkpoint: as fp32 {err_exact:.2e}, native {err_native:.2e}")
    assert err_exact <= FP32_TOL
    assert err_native <= 5e-2


def test_saved_preset_loads_in_transformers(tmp_path):
    """save_hf_checkpoint writes what transformers reads: tiny preset logits agree."""
    model = load("tiny", seed=3)
    save_hf_checkpoint(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    toks = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi, llama!"}])
    with _store(model.config) as store:
        err = rel_err(run_step(model, store, [(0, toks, 0)])[0][0], hf_logits(hf_model, toks))
    print(f"tiny preset vs transformers: {err:.2e}")
    assert err <= FP32_TOL


def test_tiny_preset_smoke():
    """Deterministic random weights, non-degenerate logits, greedy decoding through the store."""
    model = load("tiny")
    again, other = load("tiny"), load("tiny", seed=1)
    weights = [jax.tree.leaves(nnx.state(m.module, nnx.Param)) for m in (model, again, other)]
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(weights[0], weights[1]))
    assert not any(bool(jnp.array_equal(a, b)) for a, b in zip(weights[0], weights[2])
                   if a.ndim == 2)
    assert model.config.vocab_size == model.tokenizer.vocab_size
    prompt = model.tokenizer.encode("The quick brown fox", add_bos=True)
    with _store(model.config, slots=1) as store:
        logits = run_step(model, store, [(0, prompt, 0)])[0][0]
        assert np.isfinite(logits).all() and 0.3 < logits.std() < 5.0
        out = [int(logits[-1].argmax())]
        for pos in range(len(prompt), len(prompt) + 7):
            step = run_step(model, store, [(0, out[-1:], pos)])[0][0]
            out.append(int(step[-1].argmax()))
    assert all(0 <= t < model.config.vocab_size for t in out)
    assert isinstance(model.tokenizer.decode(out), str)


def test_tiny_preset_bfloat16_close_to_float32():
    ref_model, model = load("tiny"), load("tiny", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model.module))} == {jnp.dtype("bfloat16")}
    toks = _tokens(13, 7)
    toks = [t % ref_model.config.vocab_size for t in toks]
    with _store(ref_model.config) as store:
        ref = run_step(ref_model, store, [(0, toks, 0)])[0][0]
    with _store(model.config) as store:
        err = rel_err(run_step(model, store, [(0, toks, 0)])[0][0], ref)
    print(f"tiny preset bf16 vs fp32: {err:.2e}")
    assert err <= 5e-2


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3-8b"])
def test_rope_frequencies_match_transformers(preset):
    """llama3 scaling (all three bands at 1B's head_dim 64) and plain RoPE (8B)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = preset_config(preset)
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**hf_config_dict(config)))
    assert rotary.attention_scaling == 1.0
    np.testing.assert_allclose(llama.rope_inv_freq(config), rotary.inv_freq.numpy(), rtol=1e-6)


# ---- the NNX module --------------------------------------------------------------------------

AXES = {"embed", "vocab", "heads", "kv_heads", "mlp"}
QWEN_LIKE = jvt.models.ModelConfig(
    vocab_size=301, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
    num_kv_heads=2, head_dim=8, qkv_bias=True, dtype="bfloat16")


def _expected_count(c) -> int:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = 2 * c.hidden_size + c.hidden_size * (q + 2 * kv) + q * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size + (q + 2 * kv if c.qkv_bias else 0)
    head = 0 if c.tie_embeddings else c.hidden_size * c.vocab_size
    return c.vocab_size * c.hidden_size + c.num_layers * layer + c.hidden_size + head


@pytest.mark.parametrize("config", [preset_config("tiny"), QWEN_LIKE,
                                    preset_config("llama-3.2-1b"), preset_config("llama-3-8b")],
                         ids=["tiny", "qwen-like", "llama-3.2-1b", "llama-3-8b"])
def test_module_params_dtypes_and_sharding_axes(config):
    """Every weight is an nnx.Param of config.dtype with one logical axis per dimension; the
    parameter count is the architecture's. (Large presets are checked abstractly.)"""
    module = llama.abstract_module(config) if config.num_layers > 4 else \
        llama.init_module(config)
    assert isinstance(module, nnx.Module) and isinstance(module.layers, nnx.List)
    everything = nnx.to_flat_state(nnx.state(module))
    params = nnx.to_flat_state(nnx.state(module, nnx.Param))
    assert len(everything) == len(params)  # no array outside an nnx.Param
    for path, var in params:
        value = var.get_value()
        assert value.dtype == config.jnp_dtype, path
        axes = llama.logical_axes(var)
        assert len(axes) == len(value.shape) and set(axes) <= AXES, (path, axes)
    assert llama.num_params(config) == _expected_count(config)
    assert (module.lm_head is None) == config.tie_embeddings
    assert [layer.self_attn.layer for layer in module.layers] == list(range(config.num_layers))


def _dense_causal(q, k, v, meta, *, layer, scale):
    """Attention of one sequence over this step's own K/V (an explicit KV array, no store)."""
    t, hkv, d = k.shape
    cache = jnp.zeros((1, t, hkv, d), k.dtype)
    out, _, _ = jvt.ops.reference_step(q, k, v, cache, cache, meta, scale=scale)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_logprobs(graphdef, state, tokens):
    module = nnx.merge(graphdef, state)
    n = tokens.shape[0]
    meta = AttnMeta(jnp.arange(n, dtype=jnp.int32), jnp.array([0, n], jnp.int32),
                    jnp.zeros(1, jnp.int32), jnp.array([n], jnp.int32))
    return jax.nn.log_softmax(module.logits(module(tokens, meta, attend=_dense_causal)), -1)


def test_engine_decoding_equals_one_full_forward_of_the_module():
    """Chunked prefill plus step-by-step decoding through the engine and its KV store give the
    greedy tokens and log-probabilities of one causal forward of the module over the whole
    sequence with explicit KV arrays."""
    model = load("tiny", seed=4)
    engine = jvt.Engine(model, max_num_seqs=2, max_model_len=128, max_num_batched_tokens=16,
                        token_buckets=(16,), seq_buckets=(2,), prefill_chunk=7)
    prompt = model.tokenizer.encode("Cached decoding equals a full forward.", add_bos=True)
    out = engine.generate([prompt], jvt.SamplingParams(temperature=0.0, max_tokens=20,
                                                       ignore_eos=True, logprobs=3),
                          use_tqdm=False)[0]
    engine.close()
    seq = prompt + out.token_ids
    logprobs = np.asarray(_full_forward_logprobs(*nnx.split(model.module),
                                                 jnp.asarray(seq[:-1], jnp.int32)))
    rows = logprobs[len(prompt) - 1:]
    assert rows.argmax(-1).tolist() == out.token_ids
    engine_lp = np.array([lp.logprob for lp in out.logprobs])
    np.testing.assert_allclose(engine_lp, rows[np.arange(20), out.token_ids], atol=1e-4)
    for row, lp in zip(rows, out.logprobs):
        top = sorted(lp.top, key=lp.top.get, reverse=True)
        assert top == np.argsort(-row)[:3].tolist()


def test_module_called_directly_with_a_store_gives_the_engine_logits():
    """model.module(tokens, meta, store_id=...) over an explicit KVStore: the prompt's last
    row has the engine's first-token log-probabilities."""
    model = load("tiny", seed=6)
    prompt = model.tokenizer.encode("Direct use of the module", add_bos=True)
    engine = jvt.Engine(model, max_num_seqs=2, max_model_len=64, max_num_batched_tokens=32,
                        token_buckets=(32,), seq_buckets=(2,))
    first = engine.generate([prompt], jvt.SamplingParams(temperature=0.0, max_tokens=1,
                                                         logprobs=8), use_tqdm=False)[0]
    engine.close()
    with _store(model.config, slots=1) as store:
        store.reserve(0, len(prompt))
        n = len(prompt)
        meta = AttnMeta(jnp.arange(n, dtype=jnp.int32), jnp.array([0, n], jnp.int32),
                        jnp.zeros(1, jnp.int32), jnp.array([n], jnp.int32))
        hidden = model.module(jnp.asarray(prompt, jnp.int32), meta, store_id=store.store_id)
        direct = np.asarray(jax.nn.log_softmax(model.module.logits(hidden[-1:]), -1))[0]
        store.check()
    lp = first.logprobs[0]
    assert lp.token_id == int(direct.argmax()) == first.token_ids[0]
    for token, value in lp.top.items():
        assert abs(direct[token] - value) < 1e-4

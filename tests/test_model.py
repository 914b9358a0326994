"""The LLaMA-family model against Hugging Face transformers (PyTorch, fp32) on tiny random
checkpoints of each family, through the real KV store and jvt_attention op on the CPU."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import FAMILIES, VOCAB, build_hf_model, hf_logits, save_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

import jvt
from jvt.models import llama, load, preset_config, save_hf_checkpoint
from jvt.models.loader import hf_config_dict
from jvt.types import AttnMeta

FP32_TOL = 1e-4  # max |ours - ref| / max |ref| against the transformers fp32 forward


@functools.partial(jax.jit, static_argnames=("config", "store_id"))
def _step_logits(params, tokens, meta, *, config, store_id):
    hidden = llama.forward(params, tokens, meta, config=config, store_id=store_id)
    return llama.logits(params, hidden, config=config)


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
    out = np.asarray(_step_logits(model.params, jnp.asarray(tokens, jnp.int32), meta,
                                  config=model.config, store_id=store.store_id))
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
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), model.params, again.params)
    assert all(jax.tree.leaves(same))
    assert not jnp.array_equal(model.params["embed"], other.params["embed"])
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
    assert model.params["embed"].dtype == jnp.bfloat16
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

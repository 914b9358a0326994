"""Config validation, checkpoint loading (single/sharded, error cases), the orbax params cache,
presets and tokenizers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from hf_fixtures import FAMILIES, build_hf_model, save_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

from jvt.models import (
    PRESETS,
    ByteTokenizer,
    HFTokenizer,
    ModelConfig,
    load,
    loader,
    preset_config,
    save_hf_checkpoint,
)
from jvt.models.llama import num_params

SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _hf_dict(cls=transformers.LlamaConfig, **kwargs) -> dict:
    return cls(**{**SMALL, **kwargs}).to_dict()


def _equal_modules(a, b) -> bool:
    """Same weight paths, dtypes and bits."""
    fa, fb = (dict(nnx.to_flat_state(nnx.state(m.module, nnx.Param))) for m in (a, b))
    return fa.keys() == fb.keys() and all(
        fa[k].get_value().dtype == fb[k].get_value().dtype
        and bool(jnp.array_equal(fa[k].get_value(), fb[k].get_value())) for k in fa)


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_reads_each_family(family):
    cls, kwargs = FAMILIES[family]
    hf = cls(**{**SMALL, "head_dim": 16, **kwargs})
    config = ModelConfig.from_hf(hf.to_dict())
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        2, hf.num_attention_heads, hf.num_key_value_heads, 16)
    assert config.qkv_bias == (family == "qwen2")
    assert config.tie_embeddings == hf.tie_word_embeddings
    assert config.rope_theta == kwargs["rope_theta"]
    assert (config.rope_scaling is not None) == ("rope_scaling" in kwargs)


def test_from_hf_legacy_rope_spelling_matches():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    new = _hf_dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling})
    legacy = {k: v for k, v in new.items() if k != "rope_parameters"}
    legacy.update(architectures=["LlamaForCausalLM"], rope_theta=5e5,
                  rope_scaling={"type": "llama3", **scaling})
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(new)
    assert ModelConfig.from_hf(new).rope_scaling == scaling


@pytest.mark.parametrize("hf, match", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", **SMALL),
     "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    (_hf_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32}), "'yarn'"),
    (_hf_dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (_hf_dict(transformers.MistralConfig, sliding_window=64), "sliding-window"),
    (_hf_dict(transformers.Qwen2Config, use_sliding_window=True, sliding_window=64,
              max_window_layers=1), "sliding-window"),
    ({k: v for k, v in _hf_dict(transformers.Qwen2Config, use_sliding_window=True,
                                sliding_window=64).items()
      if k != "layer_types"}, "sliding-window"),  # transformers 4 configs: flags only
    (_hf_dict(attention_bias=True), "attention_bias"),
    (_hf_dict(hidden_act="gelu"), "hidden_act"),
    (_hf_dict(dtype="float64"), "dtype"),
])
def test_from_hf_rejects_unsupported(hf, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(hf)


def test_from_hf_accepts_full_attention_windows():
    """A window covering the context, or a Qwen2 window only on layers past the last one."""
    assert ModelConfig.from_hf(_hf_dict(transformers.MistralConfig, sliding_window=512))
    qwen = _hf_dict(transformers.Qwen2Config, use_sliding_window=True, sliding_window=64,
                    max_window_layers=2)
    assert set(qwen["layer_types"]) == {"full_attention"}
    assert ModelConfig.from_hf(qwen).qkv_bias


@pytest.mark.parametrize("change, match", [
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"dtype": "int8"}, "dtype"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"head_dim": 15}, "even"),
    ({"eos_token_id": (5, 999)}, "outside the vocabulary"),
    ({"rope_scaling": {"factor": 8.0}}, "llama3 rope_scaling needs keys"),
])
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(preset_config("tiny"), **change)


def test_config_is_hashable_for_jit():
    config = preset_config("llama-3.2-1b")
    assert hash(config) == hash(dataclasses.replace(config))
    assert config.eos_ids == ByteTokenizer().eos_ids


# ---- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, billions", [("llama-3.2-1b", 1.236), ("llama-3-8b", 8.030)])
def test_preset_shapes_are_the_real_models(name, billions):
    assert abs(num_params(preset_config(name)) / 1e9 - billions) < 0.001


def test_unknown_model_names_the_presets():
    with pytest.raises(ValueError, match="tiny, llama-3.2-1b, llama-3-8b"):
        preset_config("llama-4")
    with pytest.raises(ValueError, match="neither a preset.*smollm2-135m"):
        load("no/such/dir")
    assert set(PRESETS) == {"tiny", "llama-3.2-1b", "llama-3-8b"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_hf_checkpoint_round_trip_sharded(dtype, tmp_path):
    model = load("tiny", dtype=dtype, seed=2)
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=300_000)
    assert os.path.isfile(tmp_path / loader.INDEX_FILE)
    back = load(str(tmp_path), use_cache=False)
    assert back.config == model.config
    assert _equal_modules(back, model)
    assert back.tokenizer.eos_ids == model.tokenizer.eos_ids


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A llama3-family checkpoint saved single-file and sharded (one model, same weights)."""
    model = build_hf_model("llama3", seed=11)
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    save_hf_model(model, single)
    save_hf_model(model, sharded, max_shard_size="40KB")
    return single, sharded


def test_sharded_checkpoint_equals_single_file(hf_dirs):
    single, sharded = hf_dirs
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(sharded / loader.INDEX_FILE)
    a, b = load(str(single), use_cache=False), load(str(sharded), use_cache=False)
    assert a.config == b.config and _equal_modules(a, b)
    # Stored transposed ([in, out]) relative to torch's Linear [out, in].
    ref = safetensors.torch.load_file(single / "model.safetensors")
    kernel = a.module.layers[1].self_attn.k_proj.kernel.get_value()
    np.testing.assert_array_equal(np.asarray(kernel),
                                  ref["model.layers.1.self_attn.k_proj.weight"].numpy().T)


def test_orbax_cache_round_trip_is_bit_identical(hf_dirs, tmp_path, monkeypatch):
    single, _ = hf_dirs
    first = load(str(single), cache_dir=tmp_path)
    entries = os.listdir(tmp_path)
    assert len(entries) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(loader, "module_from_tensors", no_conversion)
    second = load(str(single), cache_dir=tmp_path)
    assert _equal_modules(first, second)
    assert second.config == first.config
    monkeypatch.undo()
    half = load(str(single), cache_dir=tmp_path, dtype="bfloat16")  # another dtype: new entry
    assert len(os.listdir(tmp_path)) == 2
    assert half.module.embed_tokens.embedding.get_value().dtype == jnp.bfloat16


def test_cache_key_follows_the_checkpoint_files(hf_dirs, tmp_path):
    single, _ = hf_dirs
    copy = tmp_path / "copy"
    shutil.copytree(single, copy)
    config = loader.read_hf_config(copy)
    key = loader.cache.cache_key(copy, config)
    assert key == loader.cache.cache_key(copy, config)
    weights = copy / "model.safetensors"
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = loader.cache.cache_key(copy, config)
    assert changed != key
    # A second copy with the very same file stats is another checkpoint: another entry.
    twin = tmp_path / "twin"
    shutil.copytree(copy, twin)
    for name in os.listdir(copy):
        st = os.stat(copy / name)
        os.utime(twin / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert loader.cache.cache_key(twin, config) != changed


def test_corrupt_cache_entry_is_rebuilt(hf_dirs, tmp_path):
    single, _ = hf_dirs
    first = load(str(single), cache_dir=tmp_path)
    (entry,) = os.listdir(tmp_path)
    for name in os.listdir(tmp_path / entry):
        path = tmp_path / entry / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (tmp_path / entry / "garbage").write_text("not a checkpoint")
    second = load(str(single), cache_dir=tmp_path)
    assert _equal_modules(first, second)
    third = load(str(single), cache_dir=tmp_path)  # from the rebuilt entry
    assert _equal_modules(first, third)


def _edited_copy(src, dst, edit):
    """Copy checkpoint src to dst with model.safetensors' tensors passed through edit(dict)."""
    shutil.copytree(src, dst)
    tensors = safetensors.torch.load_file(dst / "model.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "lacks tensor model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 63)}),
     r"model.layers.0.self_attn.q_proj.weight .* has shape \(64, 63\), expected \(64, 64\)"),
    (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.float64)}),
     "model.norm.weight has dtype F64"),
])
def test_bad_tensor_is_named(hf_dirs, tmp_path, edit, match):
    path = _edited_copy(hf_dirs[0], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        load(path, use_cache=False)


def test_unreadable_or_missing_shard_is_named(hf_dirs, tmp_path):
    _, sharded = hf_dirs
    truncated, missing = tmp_path / "truncated", tmp_path / "missing"
    shutil.copytree(sharded, truncated)
    shutil.copytree(sharded, missing)
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[1]
    data = (truncated / victim).read_bytes()
    (truncated / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"unreadable safetensors shard .*{victim}"):
        load(str(truncated), use_cache=False)
    (missing / victim).unlink()
    with pytest.raises(ValueError, match=f"missing: {victim}"):
        load(str(missing), use_cache=False)


def test_checkpoint_without_weights_or_tokenizer(hf_dirs, tmp_path):
    no_weights, no_tokenizer = tmp_path / "a", tmp_path / "b"
    no_weights.mkdir()
    shutil.copy(hf_dirs[0] / "config.json", no_weights)
    shutil.copy(hf_dirs[0] / "tokenizer.json", no_weights)
    with pytest.raises(ValueError, match="no safetensors weights"):
        load(str(no_weights), use_cache=False)
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_dirs[0] / f, no_tokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        load(str(no_tokenizer), use_cache=False)


def test_generation_config_eos_ids_are_added(hf_dirs, tmp_path):
    copy = tmp_path / "gen"
    shutil.copytree(hf_dirs[0], copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 262]}))
    model = load(str(copy), use_cache=False)
    assert model.config.eos_ids == (257, 262)
    assert set(model.tokenizer.eos_ids) == {257, 262}


# ---- tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_byte_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    ByteTokenizer().save_hf(path)
    return HFTokenizer(path)


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40))
def test_byte_tokenizer_round_trip_and_hf_equivalent(text, hf_byte_tokenizer):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == list(text.encode())
    assert tok.decode(ids) == text
    if "<|" not in text:  # HF tokenizers parse special-token names inside text
        assert hf_byte_tokenizer.encode(text, add_bos=True) == ids
        assert hf_byte_tokenizer.decode(ids) == text


def test_chat_templates_agree(hf_byte_tokenizer):
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hé?"},
                {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "17"}]
    ids = tok.apply_chat_template(messages)
    assert ids == hf_byte_tokenizer.apply_chat_template(messages)
    assert ids[0] == tok.bos_id and ids[-1] == tok.special_ids["<|assistant|>"]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == ids[:-1]
    assert tok.decode(ids) == "Be brief.Hé?Oui.17"
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    for bad in ({"content": "x"}, {"text": "x"}, "hello"):
        with pytest.raises(ValueError, match="'role' and 'content'"):
            tok.apply_chat_template([bad])


def test_byte_tokenizer_marks_ids_beyond_its_vocabulary():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 5000, 33]) == "hi\ufffd!"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # an incomplete UTF-8 sequence

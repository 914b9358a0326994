"""Quantized weights for the NNX LLaMA module: GGML blocks kept as a GGUF file stores them and
multiplied by the jvt_qmatmul CPU kernel (jvt/qmatmul.py, ffi/quant_cpu.cc).

`ModelConfig.weight_format` ("q4_0", "q4_1", "q8_0"; "dense" otherwise) makes every q/k/v/o
and gate/up/down projection a `QuantLinear`; `ModelConfig.head_format` does the same for the
LM head: an untied one becomes a `QuantLinear`, a tied one makes the embedding a `QuantEmbed`
(the lookup dequantizes the rows it gathers; the head multiplies by the blocks). Activations
stay float32 (the kernel's dtype; bfloat16 runs ~7x slower in XLA:CPU anyway).

    layers[i].self_attn.q_proj.blocks        uint8 [Hq*D, H/32*B]   (heads, embed)
    layers[i].mlp.down_proj.blocks           uint8 [H, I/32*B]      (embed, mlp)
    embed_tokens.embedding (QuantEmbed)      uint8 [V, H/32*B]      (vocab, embed)

B is the format's block bytes (18, 20, 34): a weight row is the HF weight's row ([out, in]
layout, blocks of 32 along `in`). Limits: the CPU only (`check_platform`), no tensor
parallelism (`check_tensor_parallel`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jvt import qmatmul
from jvt.models.config import ModelConfig
from jvt.models.params import Axes, normal, param


def random_blocks(rngs: nnx.Rngs | None, rows: int, k: int, fmt: str) -> jax.Array:
    """Valid blocks [rows, k/32*B] of weights with standard deviation about 1/sqrt(k)
    (Linear's N(0, 1/in) init): uniform random codes, one fixed float16 scale d, and for
    Q4_1 the minimum m = -8d, so that every format centres its codes on zero."""
    n_blocks = k // qmatmul.BLOCK
    code_bytes = qmatmul.FORMATS[fmt][1] - (4 if fmt == "q4_1" else 2)
    if rngs is None:  # abstract_module: shapes only
        return jnp.zeros((rows, n_blocks * qmatmul.FORMATS[fmt][1]), jnp.uint8)
    codes = jax.random.bits(rngs.params(), (rows, n_blocks, code_bytes), jnp.uint8)
    levels_std = 73.9 if fmt == "q8_0" else 4.61  # std of uniform int8, of uniform 0..15
    d = jnp.float16(1.0 / (levels_std * math.sqrt(k)))
    head = [d, -8 * d] if fmt == "q4_1" else [d]
    head_bytes = jax.lax.bitcast_convert_type(jnp.stack(head), jnp.uint8).reshape(-1)
    head_bytes = jnp.broadcast_to(head_bytes, (rows, n_blocks, head_bytes.shape[0]))
    return jnp.concatenate([head_bytes, codes], axis=-1).reshape(rows, -1)


class QuantLinear(nnx.Module):
    """y = x @ W (+ bias), W [din, dout] held as `blocks` uint8 [dout, din/32*B] in format
    fmt (row n: the GGML blocks of W[:, n]) and bias float32 [dout]. The call interface of
    models.llama.Linear: x [..., din] -> [..., dout] float32, through the jvt_qmatmul kernel.
    `axes` are Linear's (in, out) logical axes; blocks carry them as (out, in)."""

    def __init__(self, din: int, dout: int, axes: Axes, *, fmt: str, use_bias: bool,
                 rngs: nnx.Rngs | None):
        self.fmt = fmt
        self.blocks = param(random_blocks(rngs, dout, din, fmt), (axes[1], axes[0]))
        self.bias = (param(normal(rngs, (dout,), 0.02, jnp.float32), axes[1:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        blocks = self.blocks[...]
        y = qmatmul.qmatmul(x.reshape(-1, x.shape[-1]).astype(jnp.float32), blocks, self.fmt)
        y = y.reshape(*x.shape[:-1], blocks.shape[0])
        return y if self.bias is None else y + self.bias[...]


class QuantEmbed(nnx.Module):
    """Token embedding [V, H] held as `embedding` uint8 [V, H/32*B] in format fmt, for a tied
    LM head that stays quantized: the lookup gathers the tokens' rows of blocks and dequantizes
    them (gguf-py's arithmetic, so it equals the dense embedding of the same file); `attend`
    multiplies by the whole table with the kernel (one read of V*H*B/32 bytes per step)."""

    def __init__(self, vocab: int, hidden: int, *, fmt: str, rngs: nnx.Rngs | None):
        self.fmt = fmt
        self.embedding = param(random_blocks(rngs, vocab, hidden, fmt), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return qmatmul.dequantize(self.embedding[...][tokens], self.fmt)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: [N, H] -> [N, V] float32 logits."""
        return qmatmul.qmatmul(hidden.astype(jnp.float32), self.embedding[...], self.fmt)


def is_quantized(config: ModelConfig) -> bool:
    """Whether any weight of config's module is held as GGML blocks."""
    return config.weight_format != "dense" or config.head_format != "dense"


def check_platform(config: ModelConfig, platform: str) -> None:
    """ValueError when config's quantized weights cannot run on `platform` (a jax platform
    name): the jvt_qmatmul kernel exists for the CPU only."""
    if is_quantized(config) and platform != "cpu":
        raise ValueError(
            f"quantized weights (weight_format={config.weight_format!r}, head_format="
            f"{config.head_format!r}) run on the CPU only (the jvt_qmatmul kernel), not on "
            f"{platform}; load the model with weights='dense' there")


def check_tensor_parallel(config: ModelConfig, n: int) -> None:
    """ValueError when config's quantized weights would be split over n > 1 devices: not
    supported (the k/v head expansion and row-parallel splits of jvt.parallel assume dense
    [in, out] kernels)."""
    if is_quantized(config) and n > 1:
        raise ValueError(
            f"tensor_parallel={n} is not supported with quantized weights (weight_format="
            f"{config.weight_format!r}, head_format={config.head_format!r}); supported: "
            "tensor_parallel=1, or load the model with weights='dense'")

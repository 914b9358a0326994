"""The jvt_qmatmul op: y = x @ W^T for a weight W [N, K] kept in llama.cpp's GGML blocks.

A quantized weight is a uint8 matrix [N, K / 32 * block_bytes]: row n holds the K / 32
consecutive blocks of W[n, :], byte for byte as a GGUF file stores them (ffi/quant.h gives the
block layouts). `qmatmul` multiplies by it with a native CPU kernel that reads the blocks
directly (0.5625 to 1.0625 bytes per weight instead of 4); `dequantize` is the same weight as
float32 in plain JAX, with gguf-py's arithmetic (the tests' reference; the quantized embedding
lookup uses it on the rows it gathers).

    y = qmatmul(x, blocks, "q4_1")        # x [T, K] float32 -> y [T, N] float32
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jvt import ops

TARGET = "jvt_qmatmul"
BLOCK = 32  # values per block, along K
# Format name -> (GGML type id, bytes per block of 32 values).
FORMATS = {"q4_0": (2, 18), "q4_1": (3, 20), "q8_0": (8, 34)}


def check_format(fmt: str) -> None:
    """ValueError unless fmt names a block format the kernel reads."""
    if fmt not in FORMATS:
        raise ValueError(f"quantized format must be one of {sorted(FORMATS)}, got {fmt!r}")


def row_values(fmt: str, nbytes: int) -> int:
    """K, the values in one weight row of nbytes bytes in format fmt."""
    check_format(fmt)
    block_bytes = FORMATS[fmt][1]
    if nbytes <= 0 or nbytes % block_bytes:
        raise ValueError(f"a {fmt} row has a positive multiple of {block_bytes} bytes, "
                         f"got {nbytes}")
    return nbytes // block_bytes * BLOCK


def qmatmul(x: jax.Array, blocks: jax.Array, fmt: str) -> jax.Array:
    """x [T, K] float32 @ W^T -> [T, N] float32, W [N, K] given as its blocks [N, row_bytes].

    Runs on the CPU only (the XLA FFI target jvt_qmatmul is registered for platform "cpu");
    the kernel accumulates in float32 and splits the N rows over XLA's intra-op threads.
    """
    if blocks.ndim != 2 or blocks.dtype != jnp.uint8:
        raise ValueError(f"blocks must be a uint8 [N, K / {BLOCK} * block_bytes] matrix, got "
                         f"{blocks.dtype} {blocks.shape}")
    k = row_values(fmt, blocks.shape[1])
    if x.ndim != 2 or x.dtype != jnp.float32 or x.shape[1] != k:
        raise ValueError(f"x must be float32 [T, K={k}] for {fmt} blocks {blocks.shape}, got "
                         f"{x.dtype} {x.shape}")
    ops.register_targets()
    out = jax.ShapeDtypeStruct((x.shape[0], blocks.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, blocks, qtype=np.int32(FORMATS[fmt][0]))


def dequantize(blocks: jax.Array, fmt: str) -> jax.Array:
    """The weight [..., K] float32 of blocks [..., row_bytes] in format fmt, in plain JAX.

    Same arithmetic as gguf.quants.dequantize: Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q,
    with d (and m) the block's float16 scale (and minimum).
    """
    k = row_values(fmt, blocks.shape[-1])
    lead = blocks.shape[:-1]
    b = blocks.reshape(*lead, k // BLOCK, FORMATS[fmt][1])

    def half(lo: int) -> jax.Array:  # the float16 at bytes [lo, lo + 2) of every block
        pair = b[..., lo:lo + 2].astype(jnp.uint16)
        bits = pair[..., 0] | (pair[..., 1] << 8)
        return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)[..., None]

    d = half(0)
    if fmt == "q8_0":
        q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
        values = d * q
    else:
        packed = b[..., 4:] if fmt == "q4_1" else b[..., 2:]
        nibbles = jnp.concatenate([packed & 15, packed >> 4], axis=-1)  # values 0..15, 16..31
        if fmt == "q4_1":
            values = d * nibbles.astype(jnp.float32) + half(2)
        else:
            values = d * (nibbles.astype(jnp.int32) - 8).astype(jnp.float32)
    return values.reshape(*lead, k)

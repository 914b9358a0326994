"""How the NNX modules (models/llama.py, models/quant.py) create their weights: nnx.Params
carrying logical sharding axes, with random initial values, or zeros when rngs is None
(llama.abstract_module builds shapes only, and tracing random initialisers costs ~1 s)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    # eager_sharding=False: the axes are metadata for tensor parallelism, never applied at
    # creation (flax >= 0.12 would otherwise require a mesh in context).
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def normal(rngs: nnx.Rngs | None, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """N(0, std^2) values in dtype, or zeros when rngs is None."""
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)

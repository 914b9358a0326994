"""Tensor parallelism (Megatron-style) over a 1-D JAX device mesh with axis "tp".

Weights are sharded from the NNX module's logical axes: `heads` (q and o projections),
`kv_heads` (k, v) and `mlp` (gate, up, down) split across the N devices; q/k/v and gate/up
are column-parallel, o and down row-parallel, so each decoder layer needs exactly two
all-reduces (after o_proj and after down_proj: the module's `reduce` hook). `embed` is never
split: norms and the residual stream are replicated. The embedding table is replicated (a
lookup needs no communication); an untied LM head is split by vocabulary columns when N
divides the vocabulary (its logits are all-gathered, no all-reduce), else replicated, and a
tied one is the replicated embedding.

The whole step runs under `jax.shard_map`: every device runs the module on its local shards
and calls the attention op on its own KV heads, in its own KV store (a KVStoreGroup: the FFI
handler picks the member of the device it runs on by XLA's device ordinal).

KV heads fewer than devices: each KV head is replicated N / num_kv_heads times
(`expand_kv_heads`: its k/v projection columns are repeated, so every device owns one KV head
and the query heads that read it). N must divide num_heads and the intermediate size, and
num_kv_heads and N must divide one another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jvt.models.config import ModelConfig
from jvt.models.llama import Llama, abstract_module, logical_axes

AXIS = "tp"
SPLIT_AXES = frozenset({"heads", "kv_heads", "mlp"})


def check(config: ModelConfig, n: int, available: int) -> None:
    """ValueError naming the limit when the model cannot run tensor_parallel=n here."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tensor_parallel must be a positive int, got {n!r}")
    if n > available:
        raise ValueError(f"tensor_parallel={n} needs {n} devices, but {available} are "
                         "available (on the CPU: XLA_FLAGS=--xla_force_host_platform_device_"
                         "count=N before JAX starts)")
    if config.num_heads % n:
        raise ValueError(f"tensor_parallel={n} must divide num_heads={config.num_heads}")
    if config.intermediate_size % n:
        raise ValueError(f"tensor_parallel={n} must divide intermediate_size="
                         f"{config.intermediate_size}")
    if config.num_kv_heads % n and n % config.num_kv_heads:
        raise ValueError(f"tensor_parallel={n} and num_kv_heads={config.num_kv_heads} must "
                         "divide one another (fewer KV heads than devices are replicated)")


def kv_heads_per_device(config: ModelConfig, n: int) -> int:
    return max(config.num_kv_heads, n) // n


def expand_kv_heads(module: Llama, n: int) -> Llama:
    """The module with each KV head repeated n / num_kv_heads times (n > num_kv_heads):
    query head h still reads a copy of its original KV head, so outputs are unchanged."""
    config = module.config
    r = n // config.num_kv_heads
    d = config.head_dim
    wide = ModelConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                          "num_kv_heads": n})
    graphdef, abstract = nnx.split(abstract_module(wide))
    source = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    filled = []
    for path, var in nnx.to_flat_state(abstract):
        value = source[path].get_value()
        if path[-2] in ("k_proj", "v_proj"):
            heads = value.reshape(*value.shape[:-1], config.num_kv_heads, d)
            value = jnp.repeat(heads, r, axis=-2).reshape(var.get_value().shape)
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def vocab_split(config: ModelConfig, n: int) -> bool:
    """Whether the LM head is split by vocabulary columns (untied and divisible)."""
    return n > 1 and not config.tie_embeddings and config.vocab_size % n == 0


def weight_specs(module: Llama, n: int) -> list[PartitionSpec]:
    """The PartitionSpec of every weight, in the order of jax.tree.leaves(nnx.split(m)[1])."""
    split_vocab = vocab_split(module.config, n)
    _, state = nnx.split(module)
    flat = list(nnx.to_flat_state(state))
    if [id(v.get_value()) for _, v in flat] != [id(x) for x in jax.tree.leaves(state)]:
        raise RuntimeError("NNX flat-state order differs from the pytree order")
    specs = []
    for path, var in flat:
        names = [AXIS if a in SPLIT_AXES or (a == "vocab" and split_vocab and
                                             path[0] == "lm_head") else None
                 for a in logical_axes(var)]
        specs.append(PartitionSpec(*names))
    return specs


def make_mesh(devices: list[jax.Device]) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


def place(weights: list[jax.Array], specs: list[PartitionSpec], mesh: Mesh) -> list[jax.Array]:
    """Each weight on the mesh, split per its spec."""
    return [put(w, NamedSharding(mesh, s)) for w, s in zip(weights, specs)]


def put(tree, sharding):
    """jax.device_put of host values (a pytree). Under jax.distributed (several processes),
    each process places its own devices' parts from its own copy, which is the same in every
    process by construction (same weights, same requests in the same order):
    jax.device_put would check that with a cross-process all-gather of every value, a
    collective per step input that can also interleave with the collectives of a step still
    running, and deadlock."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda v: _put_local(np.asarray(v), sharding), tree)


def _put_local(value: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def all_reduce(x: jax.Array) -> jax.Array:
    """The per-layer all-reduce (inside shard_map): the sum of every device's partial x."""
    return jax.lax.psum(x, AXIS)


def gather_vocab(logits: jax.Array) -> jax.Array:
    """[N, V/n] local logits of a vocabulary-split LM head -> [N, V] (inside shard_map)."""
    return jax.lax.all_gather(logits, AXIS, axis=1, tiled=True)


def shard_step(fn, mesh: Mesh, specs: list[PartitionSpec], num_replicated: int):
    """shard_map of fn(weights, *replicated args) -> replicated outputs over the mesh.

    The outputs are replicated by construction (every device computes them from all-reduced
    or all-gathered values); check_vma is off because the custom attention call's output is
    opaque to JAX's replication inference."""
    rep = PartitionSpec()
    return jax.shard_map(fn, mesh=mesh, in_specs=(specs, *([rep] * num_replicated)),
                         out_specs=rep, check_vma=False)

"""KV memory of an engine: bytes per token, the default context length, the physical budget,
and the stores on the engine's devices (one KVStore, or a KVStoreGroup under tensor
parallelism). Rules (docs/engine.md, "Defaults from the model"):

- The physical KV budget is `kv_budget_bytes` when given. Otherwise it is what every slot
  needs at max_model_len, capped: for a host (CPU) store at a quarter of physical RAM
  (jvt.platform.host_kv_cap: host chunks are ordinary memory); on a GPU at
  gpu_memory_utilization x the device's memory minus what XLA holds (the weights, and the
  temporaries of the largest compiled step, or XLA's whole pool when it was preallocated)
  minus GPU_MARGIN for the CUDA context and libraries (`gpu_kv_budget`, after the warm-up
  compiled every step), and never more than the device has free.
- max_model_len, when not given, is the model's max_position_embeddings capped so that one
  sequence's KV fits that cap (as vLLM caps max_model_len by the KV cache it can allocate);
  on a GPU the cap before the warm-up counts the weights only.

Under tensor parallelism every device holds kv_heads / N of each token (after replicating KV
heads when there are fewer than devices): budgets and chunk sizes are per device, and the
host cap applies to the sum over devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jvt import parallel
from jvt.kv import KVStore
from jvt.kv_group import KVStoreGroup
from jvt.models.config import ModelConfig
from jvt.platform import host_kv_cap

GRANULARITY = 2 << 20  # physical allocation granularity (the store's chunk is a multiple)
GPU_MARGIN = 1 << 30  # device memory left for the CUDA context, cuBLAS/cuDNN and slack


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """How the KV cache of an engine is laid out on its devices."""

    max_model_len: int  # tokens per slot
    kv_heads: int  # KV heads per device
    token_bytes: int  # KV bytes of one token on one device (all layers, K and V)
    budget_bytes: int  # physical KV bytes per device


def plan(mc: ModelConfig, *, devices: list[jax.Device], max_num_seqs: int,
         max_model_len: int | None, kv_budget_bytes: int | None,
         gpu_memory_utilization: float) -> KVPlan:
    """The KV layout for model config `mc` on `devices` (ValueError when the budget or context
    is impossible). On a GPU without kv_budget_bytes the budget is provisional until
    `gpu_kv_budget` (after the warm-up)."""
    n = len(devices)
    kv_heads = parallel.kv_heads_per_device(mc, n)
    token_bytes = mc.num_layers * 2 * kv_heads * mc.head_dim * np.dtype(mc.jnp_dtype).itemsize
    chunk = math.lcm(GRANULARITY, token_bytes)
    if kv_budget_bytes:
        cap = kv_budget_bytes // n
    elif devices[0].platform == "cpu":
        cap = host_kv_cap() // n
    else:
        cap = min(_gpu_room(d, gpu_memory_utilization, 0) for d in devices)
        if cap < chunk:
            held = max((d.memory_stats() or {}).get("pool_bytes", 0) for d in devices)
            raise ValueError(
                f"the KV cache gets no room: under gpu_memory_utilization="
                f"{gpu_memory_utilization} XLA's pool already holds {held / 2**30:.1f} GiB of a "
                "device (if JAX started before the Engine, e.g. to build the model, it took its "
                "default pool: set XLA_PYTHON_CLIENT_PREALLOCATE=false before importing JAX) "
                "or other processes use the GPU: raise gpu_memory_utilization or free memory")
    max_len = max_model_len or _default_max_model_len(mc, token_bytes, chunk, cap)
    if max_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len={max_len} exceeds the model's "
                         f"max_position_embeddings ({mc.max_position_embeddings})")
    need = max_num_seqs * chunk * math.ceil(max_len * token_bytes / chunk)
    budget = cap if kv_budget_bytes else min(need, cap)
    return KVPlan(max_len, kv_heads, token_bytes, budget)


def gpu_kv_budget(kv: KVPlan, devices: list[jax.Device], gpu_memory_utilization: float,
                  temp_bytes: int, slots: int) -> int:
    """The KV budget per device once every step is compiled: the room `plan` describes with
    the largest step's temporaries counted, capped at what all slots need. ValueError when it
    holds no max_model_len sequence."""
    chunk = math.lcm(GRANULARITY, kv.token_bytes)
    one = chunk * math.ceil(kv.max_model_len * kv.token_bytes / chunk)
    room = min(_gpu_room(d, gpu_memory_utilization, temp_bytes) for d in devices)
    if room < one:
        raise ValueError(
            f"the model does not fit: under gpu_memory_utilization={gpu_memory_utilization} "
            f"the KV cache gets {max(room, 0) / 2**30:.2f} GiB per device after the weights and "
            f"activations, and one max_model_len={kv.max_model_len} sequence needs "
            f"{one / 2**30:.2f} GiB: raise gpu_memory_utilization or lower max_model_len")
    return min(room, slots * one)


def check_weights_fit(mc: ModelConfig, devices: list[jax.Device],
                      gpu_memory_utilization: float) -> None:
    """Before loading onto GPUs: ValueError when the weights alone (split over the devices)
    exceed gpu_memory_utilization of a device minus GPU_MARGIN."""
    from jvt import _native
    from jvt.models.llama import num_params

    per_device = num_params(mc) * np.dtype(mc.jnp_dtype).itemsize / len(devices)
    _, total = _native._cuda_mem_info(devices[0].local_hardware_id)
    room = gpu_memory_utilization * total - GPU_MARGIN
    if per_device > room:
        raise ValueError(
            f"the model does not fit: its weights need {per_device / 2**30:.2f} GiB per device, "
            f"gpu_memory_utilization={gpu_memory_utilization} allows {room / 2**30:.2f} GiB of "
            f"the {total / 2**30:.1f} GiB device: raise gpu_memory_utilization or "
            "tensor_parallel")


def _gpu_room(device: jax.Device, utilization: float, temp_bytes: int) -> int:
    """Bytes of `device` left for KV chunks: utilization x total minus what XLA holds or will
    hold for temp_bytes of step temporaries, minus GPU_MARGIN, within the free memory."""
    from jvt import _native

    free, total = _native._cuda_mem_info(device.local_hardware_id)
    stats = device.memory_stats() or {}
    in_use = stats.get("bytes_in_use", 0)
    held = max(stats.get("pool_bytes", 0), in_use + temp_bytes)
    growth = max(0, in_use + temp_bytes - stats.get("pool_bytes", 0))  # not yet taken
    return int(min(utilization * total - held - GPU_MARGIN, free - growth - GPU_MARGIN))


def make_store(mc: ModelConfig, kv: KVPlan, slots: int,
               devices: list[jax.Device]) -> KVStore | KVStoreGroup:
    """One store per device of this process (host stores for CPU devices); a group under
    tensor parallelism (with jax.distributed, of this process's devices only: the others'
    stores live in their own processes)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    stores = [KVStore(mc.num_layers, kv.kv_heads, mc.head_dim, mc.dtype, slots,
                      kv.max_model_len, kv.budget_bytes,
                      "cpu" if d.platform == "cpu" else f"cuda:{d.local_hardware_id}")
              for d in local]
    if len(devices) == 1:
        return stores[0]
    return KVStoreGroup(stores, [ffi_ordinal(d) for d in local])


def ffi_ordinal(device: jax.Device) -> int:
    """The device ordinal XLA hands the FFI handler on ``device``: the CUDA ordinal on a GPU
    (process-local), the global device id on the CPU (the process-local index in one process;
    under jax.distributed process 1's CPU device has id 2048, measured)."""
    return device.id if device.platform == "cpu" else device.local_hardware_id


def _default_max_model_len(mc: ModelConfig, token_bytes: int, chunk: int, cap: int) -> int:
    fits = (cap // chunk) * (chunk // token_bytes)
    if fits < 2:
        raise ValueError(f"the KV budget ({cap} bytes per device) holds less than two tokens "
                         f"of this model ({token_bytes} bytes each): raise kv_budget_bytes")
    return min(mc.max_position_embeddings, fits)

"""Where an engine runs: its JAX device, XLA's memory pool, the persistent compilation cache,
and the defaults that depend on the machine (the host KV budget cap)."""

from __future__ import annotations

import os
import warnings

import jax

from jvt.models.cache import cache_root

HOST_KV_FRACTION = 0.25  # default cap of a host (CPU) store's physical KV: a quarter of RAM


def jax_devices(device: str, count: int, gpu_memory_utilization: float) -> list[jax.Device]:
    """`count` jax.Devices from "cpu", "cuda" or "cuda:N" on (ValueError when too few; under
    jax.distributed the devices are every process's, and each process must own one). On
    CUDA, before JAX initialises, XLA's pool is made to grow on demand up to
    gpu_memory_utilization of the device (the KV chunks live outside it), unless the
    XLA_PYTHON_CLIENT_* variables say otherwise."""
    if device == "cpu":
        cpus = jax.devices("cpu")
        if count > len(cpus):
            raise ValueError(f"tensor_parallel={count} needs {count} CPU devices, JAX has "
                             f"{len(cpus)} (set XLA_FLAGS=--xla_force_host_platform_device_"
                             f"count={count} before JAX starts)")
        return _owned(cpus[:count])
    from jax._src import xla_bridge

    pool_vars = {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"}
    if not getattr(xla_bridge, "backends_are_initialized", lambda: True)():
        if not pool_vars & os.environ.keys():
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(gpu_memory_utilization)
    elif not pool_vars & os.environ.keys():
        warnings.warn("JAX was initialised before the Engine with XLA's default pool (75% of GPU "
                      "memory), which leaves little for the KV cache: set "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION before importing JAX", stacklevel=3)
    index = int(device.partition(":")[2] or 0)
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if index + count > len(gpus):
        raise ValueError(f"device={device!r} with tensor_parallel={count} needs GPUs "
                         f"{index}..{index + count - 1}, but JAX sees {len(gpus)} GPU(s)")
    return _owned(gpus[index:index + count])


def _owned(devices: list[jax.Device]) -> list[jax.Device]:
    if not any(d.process_index == jax.process_index() for d in devices):
        raise ValueError(f"tensor_parallel={len(devices)} uses devices of other processes "
                         f"only; under jax.distributed each process must own one of the "
                         f"engine's devices (tensor_parallel = all processes' devices)")
    return devices


def enable_compilation_cache(directory: str | None) -> str:
    """Turn on JAX's persistent compilation cache in `directory` (None: <cache root>/xla)
    unless the process already set one (JAX_COMPILATION_CACHE_DIR or an earlier engine);
    returns the directory in use. Every compilation is cached, however quick: the CPU step
    shapes compile in about a second each and load in milliseconds."""
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    directory = directory or os.path.join(cache_root(), "xla")
    os.makedirs(directory, exist_ok=True)
    compilation_cache.set_cache_dir(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # JAX decides once whether to use the cache: decide anew
    return directory


def host_kv_cap() -> int:
    """Default cap of a host store's physical KV bytes: HOST_KV_FRACTION of physical RAM."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * HOST_KV_FRACTION)

"""Tensor parallelism across processes: multi-controller JAX (docs/scaling.md).

Every process calls ``initialize`` before it builds an Engine, then builds the same Engine
(``tensor_parallel`` = the devices of all processes together) and makes the same calls in the
same order: each process runs the same SPMD step on its own devices, holds its devices' share
of the weights and of the KV heads, and gets every token. Collectives go over gloo on the CPU
and NCCL on GPUs. Nothing sends requests from one process to the others: the caller does (the
server does not yet; docs/scaling.md says what has run).
"""

from __future__ import annotations


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the ``num_processes`` processes of one engine (process 0 also runs the
    coordinator at ``coordinator_address``, host:port). ValueError for impossible values;
    call it before anything initialises a JAX backend."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an int in [0, {num_processes}), got "
                         f"{process_id!r}")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)

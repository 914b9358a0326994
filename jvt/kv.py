"""The virtual-memory KV store: Python face of the native store (ffi/kv_store.h).

Every slot is one contiguous virtual range of ``max_tokens * token_bytes`` bytes (rounded up
to whole chunks), backed by physical chunks mapped on demand. Layout, token-major with all
layers interleaved: slot s, position t, layer l, K|V kv, kv head h, element d lives at
``base + s*slot_stride + t*token_bytes + ((l*2 + kv)*kv_heads + h)*head_dim*elem + d*elem``.
Design and lifecycle (reserve -> map -> release -> fence/retire): docs/kv_store.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Self

import ml_dtypes
import numpy as np

from jvt import _native

_DTYPE_CODES = {  # native jvt::DType values
    np.dtype(np.float32): 0,
    np.dtype(np.float16): 1,
    np.dtype(ml_dtypes.bfloat16): 2,
}
_DTYPE_NAMES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class KVCacheFull(RuntimeError):
    """A reserve needed more physical chunks than the budget has left; nothing was changed.

    The scheduler handles it (preempt or wait). Attributes: ``needed_chunks`` (new chunks the
    reserve asked for), ``available_chunks`` (free + not yet created within the budget),
    ``chunk_bytes``; ``needed_bytes`` / ``available_bytes`` are the same in bytes.
    """

    def __init__(self, message: str, needed_chunks: int, available_chunks: int, chunk_bytes: int):
        super().__init__(message)
        self.needed_chunks = needed_chunks
        self.available_chunks = available_chunks
        self.chunk_bytes = chunk_bytes

    @property
    def needed_bytes(self) -> int:
        return self.needed_chunks * self.chunk_bytes

    @property
    def available_bytes(self) -> int:
        return self.available_chunks * self.chunk_bytes


class KVCapacityError(RuntimeError):
    """An attention kernel saw a sequence longer than its slot's mapped capacity (or a bad slot).

    The kernel skipped that sequence (zero output, nothing written) and raised the store's error
    flag; ``KVStore.check()`` turns the flag into this exception.
    """


@dataclasses.dataclass(frozen=True)
class KVStats:
    """A snapshot of the store's bookkeeping (``KVStore.stats()``).

    Chunk counts are physical chunks of ``chunk_bytes``. ``chunks_in_use + chunks_free`` is the
    number of chunk ids the pool has handed out; ``chunks_created`` (physically allocated) can
    trail it while mappings are pending, because chunks are created by the mapper.
    """

    chunks_created: int  # physical chunks allocated from the driver/OS (kept until close)
    chunks_in_use: int  # chunks referenced by a slot (including pending and draining slots)
    chunks_free: int  # chunks in the pool, ready for reuse
    chunks_shared: int  # chunks mapped into more than one slot
    mapped_bytes: int  # virtual bytes currently backed, summed over slots
    pending_jobs: int  # slots whose extension is queued and not yet mapped
    fence_step: int  # latest fence(step), -1 before the first
    retired_step: int  # latest retire(step), -1 before the first
    reserved_tokens: tuple[int, ...]  # [slots] tokens reserved per slot
    mapped_tokens: tuple[int, ...]  # [slots] mapped capacity per slot (the capacity table)
    draining: tuple[bool, ...]  # [slots] released, waiting for retire


def cuda_available() -> bool:
    """True when a CUDA store can be created here (driver, device and a CUDA build present)."""
    return _native.cuda_status() == ""


def _dtype_code(dtype) -> tuple[np.dtype, int]:
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r} not supported (allowed: {sorted(_DTYPE_NAMES)})")
        dtype = _DTYPE_NAMES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"dtype={dtype!r} not supported (allowed: bfloat16, float16, float32)"
        ) from None
    if dt not in _DTYPE_CODES:
        raise ValueError(f"dtype={dt} not supported (allowed: bfloat16, float16, float32)")
    return dt, _DTYPE_CODES[dt]


def _device_index(device: str) -> int:
    if device == "cpu":
        return -1
    m = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if m is None:
        raise ValueError(f"device={device!r} not understood (allowed: 'cpu', 'cuda', 'cuda:N')")
    return int(m.group(1) or 0)


class KVStore:
    """A KV cache of ``slots`` sequences of up to ``max_tokens`` tokens each, in virtual memory.

    Args:
      layers, kv_heads, head_dim: the K/V shape stored per token (kv_heads per device shard).
      dtype: "bfloat16", "float16", "float32" or a numpy/jax dtype of those.
      slots: sequences resident at once.
      max_tokens: per-slot capacity limit (virtual; costs address space only).
      budget_bytes: physical memory the chunk pool may create (floor to whole chunks).
      device: "cpu" (host backend, memfd + mmap) or "cuda:N" (CUDA VMM on device N).

    Thread-safe. Use as a context manager or call ``close()``; the store is also registered
    under ``store_id`` for the attention FFI handlers until closed.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, slots: int,
                 max_tokens: int, budget_bytes: int, device: str = "cpu"):
        self.dtype, code = _dtype_code(dtype)
        self.device = device
        self._native = _native.KVStore(layers, kv_heads, head_dim, code, slots, max_tokens,
                                       budget_bytes, _device_index(device))
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.slots, self.max_tokens, self.budget_bytes = slots, max_tokens, budget_bytes
        layout = self._native.layout()
        self.elem_bytes: int = layout["elem_bytes"]
        self.token_bytes: int = layout["token_bytes"]  # bytes of one token, all layers, K and V
        self.chunk_bytes: int = layout["chunk_bytes"]  # lcm(granularity, token_bytes)
        self.tokens_per_chunk: int = layout["tokens_per_chunk"]
        self.chunks_per_slot: int = layout["chunks_per_slot"]
        self.slot_stride: int = layout["slot_stride"]  # bytes between slot starts
        self.budget_chunks: int = layout["budget_chunks"]

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def store_id(self) -> int:
        """The registry id the attention op takes as its ``store_id`` attribute."""
        return self._native.store_id

    def close(self) -> None:
        """Unregister the store and free its memory (once no FFI call still holds it)."""
        self._native.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- slot operations ---------------------------------------------------------------

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Grow ``slot`` to hold at least ``n_tokens`` tokens (a smaller n is a no-op).

        The budget is charged at once; raises ``KVCacheFull`` (store unchanged) when it is
        exhausted. The mapping is done by a background thread; ``apply_pending()`` (called by
        the attention op before any kernel) completes it on the caller's thread if needed.
        """
        try:
            self._native.reserve(slot, n_tokens)
        except _native.KVCacheFullError as e:
            message, needed, available = e.args
            raise KVCacheFull(message, needed, available, self.chunk_bytes) from None

    def apply_pending(self) -> None:
        """Map every queued extension now; one atomic load when nothing is queued."""
        self._native.apply_pending()

    def set_budget_bytes(self, budget_bytes: int) -> None:
        """Change the physical budget (nothing is allocated: chunks are created on demand).
        ValueError when it holds no chunk or fewer chunks than are handed out already."""
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool):
            raise ValueError(f"budget_bytes must be an int, got {budget_bytes!r}")
        self._native.set_budget_bytes(budget_bytes)
        self.budget_bytes = budget_bytes
        self.budget_chunks = self._native.layout()["budget_chunks"]

    def share(self, dst: int, src: int, n_tokens: int) -> int:
        """Map the whole chunks among the first ``n_tokens`` of ``src`` into the empty ``dst``.

        Zero copy (chunks are refcounted). Returns the tokens shared, a multiple of
        ``tokens_per_chunk``; the caller recomputes the rest into fresh chunks.
        """
        return self._native.share(dst, src, n_tokens)

    def release(self, slot: int) -> None:
        """Give the slot's chunks back once the device is past every step that may use it.

        The slot drains until ``retire(step)`` with step >= the fence at release time (at once
        when that step has already retired); meanwhile it cannot be reserved or shared into.
        Releasing an empty slot does nothing.
        """
        self._native.release(slot)

    def fence(self, step: int) -> None:
        """Record that step ``step`` is being enqueued on the device (monotone)."""
        self._native.fence(step)

    def retire(self, step: int) -> None:
        """Every step <= ``step`` has finished: unmap and recycle what was released up to it."""
        self._native.retire(step)

    # -- swapping (preemption) ---------------------------------------------------------

    def swap_out(self, slot: int, n_tokens: int) -> np.ndarray:
        """Copy the KV of the first ``n_tokens`` positions of ``slot`` to host memory.

        Returns a new uint8 array of ``n_tokens * token_bytes`` bytes (the slot's contiguous
        range, every layer of each token), complete when this returns. Pending mappings are
        applied first; ValueError unless 0 <= n_tokens <= the slot's mapped capacity.
        Precondition (the caller's): no enqueued device step still writes those positions.
        """
        if not isinstance(n_tokens, int | np.integer) or not 0 <= n_tokens <= self.max_tokens:
            raise ValueError(f"swap_out: n_tokens={n_tokens!r} must be an int in "
                             f"[0, {self.max_tokens}]")
        data = np.empty(n_tokens * self.token_bytes, np.uint8)
        self._native.swap_out(slot, n_tokens, data)
        return data

    def swap_in(self, slot: int, data: np.ndarray) -> None:
        """Copy ``data`` (from ``swap_out``) back into the first positions of ``slot``.

        ``data`` must be a 1-D uint8 array of a whole number of tokens (``token_bytes`` each);
        its ``len(data) // token_bytes`` tokens must lie within the slot's mapped capacity
        (reserve them first; pending mappings are applied). Complete when this returns.
        Precondition (the caller's): no enqueued device step touches the slot.
        """
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError("swap_in: data must be a 1-D uint8 numpy array (from swap_out), "
                             f"got {type(data).__name__} "
                             f"{getattr(data, 'dtype', '')}{getattr(data, 'shape', '')}")
        if data.size % self.token_bytes:
            raise ValueError(f"swap_in: data has {data.size} bytes, not a multiple of "
                             f"token_bytes={self.token_bytes}")
        self._native.swap_in(slot, data.size // self.token_bytes, np.ascontiguousarray(data))

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> KVStats:
        """A consistent snapshot of chunk and slot bookkeeping (see ``KVStats``)."""
        s = self._native.stats()
        for key in ("reserved_tokens", "mapped_tokens"):
            s[key] = tuple(s[key])
        s["draining"] = tuple(bool(d) for d in s["draining"])
        return KVStats(**s)

    def slot_chunks(self, slot: int) -> list[int]:
        """The physical chunk ids backing ``slot``, in order."""
        return self._native.slot_chunks(slot)

    def capacity(self) -> np.ndarray:
        """A copy of the capacity table: int32 [slots] mapped tokens per slot."""
        return np.asarray(self._native.capacity_table(), dtype=np.int32)

    @property
    def base(self) -> int:
        """Address of the virtual reservation (slot 0, token 0)."""
        return self._native.base()

    @property
    def capacity_table_ptr(self) -> int:
        """Device-readable address of the int32 [slots] capacity table."""
        return self._native.capacity_table_ptr()

    @property
    def error_flag_ptr(self) -> int:
        """Device-writable address of the int32 error flag."""
        return self._native.error_flag_ptr()

    def take_error(self) -> int:
        """Read and clear the error flag (nonzero: a kernel saw a capacity violation)."""
        return self._native.take_error()

    def check(self) -> None:
        """Raise ``KVCapacityError`` if a kernel flagged a capacity violation (and clear it)."""
        code = self.take_error()
        if code != 0:
            raise KVCapacityError(
                f"KV store {self.store_id}: an attention kernel saw a sequence longer than its "
                f"slot's mapped capacity, or an invalid slot (error flag {code}); that "
                "sequence's output was zeroed. reserve() every slot to its seq_len before the step."
            )

    # -- test hooks --------------------------------------------------------------------

    def write_token(self, slot: int, pos: int, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write one token's K and V ([kv_heads, head_dim], cast to the store dtype) of a layer.

        ``pos`` must lie within the slot's mapped capacity (pending mappings are applied).
        """
        shape = (self.kv_heads, self.head_dim)
        for name, a in (("k", k), ("v", v)):
            if np.shape(a) != shape:
                raise ValueError(f"{name} has shape {np.shape(a)}, expected {shape}")
        data = np.stack([np.asarray(k), np.asarray(v)]).astype(self.dtype)
        self._native.write_token(slot, pos, layer, data.tobytes())

    def read_token(self, slot: int, pos: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one token's (K, V) of a layer, each [kv_heads, head_dim] in the store dtype."""
        raw = self._native.read_token(slot, pos, layer)
        kv = np.frombuffer(raw, dtype=self.dtype).reshape(2, self.kv_heads, self.head_dim)
        return kv[0].copy(), kv[1].copy()

    def __repr__(self) -> str:
        return (
            f"KVStore(layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"dtype={self.dtype}, slots={self.slots}, max_tokens={self.max_tokens}, "
            f"budget_bytes={self.budget_bytes}, device={self.device!r})"
        )

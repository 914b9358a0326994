"""A tensor-parallel KV store: one native KVStore per device behind the KVStore interface.

Each device's store holds that device's KV heads of every token (1/N of the KV bytes); every
call of the scheduler (reserve, share, release, fence, retire, swap) reaches all of them, so
all members map and release the same slots' chunks in lockstep and keep identical chunk
accounting. The group registers natively under its own id, the `store_id` the attention op
takes: each shard's handler picks its device's member by XLA's device ordinal.

Sizes seen through the group are totals over the devices: a logical chunk is one chunk on
every device (`chunk_bytes`, `token_bytes` summed), so swap space and budget arithmetic stay
in real bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Self

import numpy as np

from jvt import _native
from jvt.kv import KVStats, KVStore


class KVStoreGroup:
    """N KVStores of one shape on N devices, driven as one.

    Args:
      stores: the member stores (same layers, kv_heads, head_dim, dtype, slots, max_tokens,
        budget), one per device, in mesh order.
      ordinals: the XLA device ordinal (`jax.Device.id` of a local device) of each member.
    """

    def __init__(self, stores: Sequence[KVStore], ordinals: Sequence[int]):
        if len(stores) != len(ordinals) or not stores:
            raise ValueError("KVStoreGroup needs one device ordinal per store, at least one")
        shapes = {(s.layers, s.kv_heads, s.head_dim, s.dtype, s.slots, s.max_tokens,
                   s.chunk_bytes, s.budget_chunks) for s in stores}
        if len(shapes) != 1:
            raise ValueError(f"the stores of a group must share one shape, got {shapes}")
        self.stores = list(stores)
        first = self.stores[0]
        self.layers, self.kv_heads, self.head_dim = first.layers, first.kv_heads, first.head_dim
        self.dtype, self.slots, self.max_tokens = first.dtype, first.slots, first.max_tokens
        self.tokens_per_chunk = first.tokens_per_chunk
        self.chunks_per_slot = first.chunks_per_slot
        self.budget_chunks = first.budget_chunks
        self.token_bytes = sum(s.token_bytes for s in self.stores)  # all devices' parts
        self.chunk_bytes = sum(s.chunk_bytes for s in self.stores)
        self._group_id = _native.register_group(
            [(int(o), s.store_id) for o, s in zip(ordinals, self.stores)])

    @property
    def store_id(self) -> int:
        """The id the attention op takes: each shard uses the member of its device."""
        return self._group_id

    def close(self) -> None:
        _native.unregister_group(self._group_id)
        for s in self.stores:
            s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- slot operations, on every member ----------------------------------------------

    def reserve(self, slot: int, n_tokens: int) -> None:
        """KVStore.reserve on every member. Members keep identical accounting, so the first
        raises KVCacheFull (nothing changed anywhere) whenever any would."""
        for s in self.stores:
            s.reserve(slot, n_tokens)

    def apply_pending(self) -> None:
        for s in self.stores:
            s.apply_pending()

    def set_budget_bytes(self, budget_bytes: int) -> None:
        """The budget of every member (bytes per device)."""
        for s in self.stores:
            s.set_budget_bytes(budget_bytes)
        self.budget_chunks = self.stores[0].budget_chunks

    def share(self, dst: int, src: int, n_tokens: int) -> int:
        shared = {s.share(dst, src, n_tokens) for s in self.stores}
        if len(shared) != 1:
            raise RuntimeError(f"group members shared different token counts: {shared}")
        return shared.pop()

    def release(self, slot: int) -> None:
        for s in self.stores:
            s.release(slot)

    def fence(self, step: int) -> None:
        for s in self.stores:
            s.fence(step)

    def retire(self, step: int) -> None:
        for s in self.stores:
            s.retire(step)

    def swap_out(self, slot: int, n_tokens: int) -> np.ndarray:
        """Every device's part of the slot's first n_tokens, concatenated (device order)."""
        return np.concatenate([s.swap_out(slot, n_tokens) for s in self.stores])

    def swap_in(self, slot: int, data: np.ndarray) -> None:
        """Split ``data`` (from swap_out) back into each device's part."""
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1 or \
                data.size % self.token_bytes:
            raise ValueError("swap_in: data must be a 1-D uint8 array from swap_out of this "
                             f"group ({self.token_bytes} bytes per token)")
        n_tokens = data.size // self.token_bytes
        offset = 0
        for s in self.stores:
            size = n_tokens * s.token_bytes
            s.swap_in(slot, data[offset:offset + size])
            offset += size

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> KVStats:
        """Chunk counts and mapped bytes summed over the devices; the slot tables (equal on
        every device) from the first."""
        per = self.device_stats()
        total = {f: sum(getattr(p, f) for p in per) for f in
                 ("chunks_created", "chunks_in_use", "chunks_free", "chunks_shared",
                  "mapped_bytes", "pending_jobs")}
        return dataclasses.replace(per[0], **total)

    def device_stats(self) -> list[KVStats]:
        """Each member's own KVStats, in device order."""
        return [s.stats() for s in self.stores]

    def slot_chunks(self, slot: int) -> list[int]:
        return self.stores[0].slot_chunks(slot)

    def check(self) -> None:
        for s in self.stores:
            s.check()

    def __repr__(self) -> str:
        return f"KVStoreGroup({len(self.stores)} x {self.stores[0]!r})"

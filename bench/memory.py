"""KV memory accounting of four layouts over one trace of live sequence lengths.

Schemes, for sequences of lengths L_i (tokens), token_bytes = layers * 2 * Hkv * D * elem:
- live:      sum L_i * token_bytes (what the tokens need);
- static:    slots * max_len * token_bytes, preallocated whatever the lengths
             (JetStream/MaxText-style max-length cache);
- paged16:   sum ceil(L_i / 16) * 16 * token_bytes (vLLM blocks of 16 tokens);
- jvt:       token-major chunks: chunk = lcm(2 MiB, token_bytes) holding chunk / token_bytes
             tokens of all layers; sum ceil(L_i / tokens_per_chunk) * chunk;
- per_layer: vTensor/vAttention layout: each layer's K and V is its own virtual buffer grown
             in 2 MiB chunks: sum 2 * layers * ceil(L_i * Hkv * D * elem / 2 MiB) * 2 MiB.
A slot with L_i = 0 holds nothing in any scheme but static.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

MiB = 1 << 20
GRANULARITY = 2 * MiB  # CUDA VMM allocation granularity on current GPUs
SCHEMES = ("live", "static", "paged16", "jvt", "per_layer")


@dataclasses.dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    elem_bytes: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"KVShape.{f.name} must be >= 1, got {getattr(self, f.name)}")

    @property
    def token_bytes(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def layer_token_bytes(self) -> int:
        """Bytes of one token in one layer's K (or V) buffer."""
        return self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def chunk_bytes(self) -> int:
        """jvt's chunk: the smallest multiple of the granularity that token_bytes divides."""
        return math.lcm(GRANULARITY, self.token_bytes)

    @property
    def tokens_per_chunk(self) -> int:
        return self.chunk_bytes // self.token_bytes


def seq_bytes(scheme: str, length: int, shape: KVShape, *, max_len: int = 0) -> int:
    """Bytes one sequence of `length` tokens holds under `scheme` (static: max_len tokens)."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    tb = shape.token_bytes
    if scheme == "live":
        return length * tb
    if scheme == "static":
        if max_len < length:
            raise ValueError(f"static needs max_len >= length, got {max_len} < {length}")
        return max_len * tb
    if scheme == "paged16":
        return math.ceil(length / 16) * 16 * tb
    if scheme == "jvt":
        return math.ceil(length / shape.tokens_per_chunk) * shape.chunk_bytes
    if scheme == "per_layer":
        per_buf = math.ceil(length * shape.layer_token_bytes / GRANULARITY) * GRANULARITY
        return 2 * shape.layers * per_buf
    raise ValueError(f"unknown scheme {scheme!r}; allowed: {SCHEMES}")


def step_bytes(lengths: Sequence[int], shape: KVShape, *, slots: int, max_len: int
               ) -> dict[str, int]:
    """Bytes held by each scheme for one step's live lengths (0 entries are empty slots)."""
    live = [n for n in lengths if n > 0]
    if len(live) > slots:
        raise ValueError(f"{len(live)} live sequences exceed slots={slots}")
    out = {s: sum(seq_bytes(s, n, shape) for n in live) for s in SCHEMES if s != "static"}
    out["static"] = slots * max_len * shape.token_bytes
    return out


def timeline(trace: Iterable[Sequence[int]], shape: KVShape, *, slots: int, max_len: int
             ) -> dict[str, list[int]]:
    """Per scheme, the bytes held at every step of a trace of live lengths."""
    out: dict[str, list[int]] = {s: [] for s in SCHEMES}
    for lengths in trace:
        for s, b in step_bytes(lengths, shape, slots=slots, max_len=max_len).items():
            out[s].append(b)
    return out


def max_concurrent(scheme: str, length: int, budget_bytes: int, shape: KVShape, *,
                   max_len: int = 0) -> int:
    """How many sequences of `length` tokens fit in `budget_bytes` of KV memory.

    Memory comes in the scheme's unit (a 16-token block, a jvt chunk, a 2 MiB per-layer
    chunk, a max_len slot), so the budget is first cut into whole units."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    unit = {
        "live": shape.token_bytes,
        "static": max_len * shape.token_bytes,
        "paged16": 16 * shape.token_bytes,
        "jvt": shape.chunk_bytes,
        "per_layer": GRANULARITY,
    }.get(scheme)
    if unit is None:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: {SCHEMES}")
    per_seq = seq_bytes(scheme, length, shape, max_len=max_len)
    return (budget_bytes // unit) // (per_seq // unit)

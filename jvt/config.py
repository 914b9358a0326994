"""EngineConfig: every knob of an Engine, validated once at construction."""

from __future__ import annotations

import dataclasses
import re


def _geometric_up_to(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 4*lo, 16*lo, ... below hi, then hi: few shapes (each one is compiled twice at
    start-up) for at most 4x padding."""
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= 4
    return (*sizes, hi)


PREEMPTION_MODES = ("swap", "recompute")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and policies (pass them as keyword arguments to ``jvt.Engine``).

    max_num_seqs: KV slots, i.e. sequences resident at once (running or retained).
    max_model_len: prompt + generated tokens of one sequence (the per-slot capacity).
    max_num_batched_tokens: token budget of one step (decode tokens + prefill chunks).
    kv_budget_bytes: physical KV memory the store may map; None maps at most what all slots at
      max_model_len need.
    device: "cpu", "cuda" or "cuda:N". dtype: activation/KV dtype (None: the model's).
    prefill_chunk: most prompt tokens of one sequence per step (chunked prefill).
    token_buckets / seq_buckets: the compiled step shapes (T packed tokens, S sequences); None
      derives 16, 64, 256, ... up to max_num_batched_tokens and 4, 16, 64, ... up to
      max_num_seqs.
    preemption_mode: what a sequence preempted under KV pressure keeps. "swap": the KV it has
      computed is copied to host memory and back into a slot when it is re-admitted (bit-exact
      continuation; the host waits for the step in flight first). "recompute": the KV is dropped
      and its tokens are prefilled again (through other kernels on CUDA, so bf16 outputs may
      differ after a preemption). See docs/engine.md.
    swap_space_bytes: host memory for swapped KV; a victim that would exceed it is recomputed.
    enable_prefix_sharing: map the KV chunks of a shared, chunk-aligned prompt prefix from a
      live or retained slot instead of recomputing them; finished requests keep their slot
      (retained, evicted LRU) so later requests can share from it.
    seed: base of the per-request sampling seeds of requests that give none.
    xla_mem_fraction: on CUDA, XLA's memory pool fraction set before JAX initialises (the KV
      chunks live outside that pool); ignored if JAX is already initialised or the variable is set.
    """

    max_num_seqs: int = 16
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    kv_budget_bytes: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    prefill_chunk: int = 256
    token_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    preemption_mode: str = "swap"
    swap_space_bytes: int = 4 << 30
    enable_prefix_sharing: bool = True
    seed: int = 0
    xla_mem_fraction: float = 0.5

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "prefill_chunk"):
            _positive_int(name, getattr(self, name))
        if self.kv_budget_bytes is not None:
            _positive_int("kv_budget_bytes", self.kv_budget_bytes)
        for name in ("seed", "swap_space_bytes"):
            _non_negative_int(name, getattr(self, name))
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(
                f"EngineConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError("EngineConfig.dtype must be None, 'bfloat16', 'float16' or "
                             f"'float32', got {self.dtype!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"EngineConfig.preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        if not isinstance(self.enable_prefix_sharing, bool):
            raise ValueError("EngineConfig.enable_prefix_sharing must be a bool, got "
                             f"{self.enable_prefix_sharing!r}")
        if not (isinstance(self.xla_mem_fraction, float) and 0.0 < self.xla_mem_fraction < 1.0):
            raise ValueError("EngineConfig.xla_mem_fraction must be a float in (0, 1), got "
                             f"{self.xla_mem_fraction!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): a step must fit one decode token of every sequence")
        tokens = self.token_buckets or _geometric_up_to(16, self.max_num_batched_tokens)
        seqs = self.seq_buckets or _geometric_up_to(4, self.max_num_seqs)
        object.__setattr__(self, "token_buckets", _buckets("token_buckets", tokens,
                                                           self.max_num_batched_tokens))
        object.__setattr__(self, "seq_buckets", _buckets("seq_buckets", seqs, self.max_num_seqs))

    @property
    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (T, S) bucket pair the runner compiles, each in a greedy-only and a sampling
        variant (a step has at least one token per sequence, so S <= T)."""
        return [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")


def _non_negative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"EngineConfig.{name} must be an int >= 0, got {value!r}")


def _buckets(name: str, sizes, top: int) -> tuple[int, ...]:
    sizes = tuple(sizes)
    for n in sizes:
        _positive_int(name, n)
    sizes = tuple(sorted(set(sizes)))
    if sizes[-1] != top:
        raise ValueError(f"EngineConfig.{name} must end at {top} (the matching limit), "
                         f"got {sizes}")
    return sizes


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


def make_config(**kwargs) -> EngineConfig:
    """EngineConfig from keyword arguments; unknown names -> ValueError listing the allowed."""
    unknown = sorted(set(kwargs) - CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; allowed: {sorted(CONFIG_FIELDS)}")
    return EngineConfig(**kwargs)

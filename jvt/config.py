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
WEIGHT_MODES = ("auto", "dense", "quantized")
# EngineConfig.decode_steps by device kind (docs/benchmarks.md: measured on the CPU; the CUDA
# value is not measured yet)
DEFAULT_DECODE_STEPS = {"cpu": 8, "cuda": 8}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and policies (pass them as keyword arguments to ``jvt.Engine``).

    tensor_parallel: devices the model is split over (Megatron-style, jvt.parallel): "cuda"
      or "cuda:K" with N > 1 uses GPUs K..K+N-1; "cpu" uses the first N CPU devices.
    max_num_seqs: KV slots, i.e. sequences resident at once (running or retained).
    max_model_len: prompt + generated tokens of one sequence (the per-slot capacity); None:
      the model's max_position_embeddings, capped so that one sequence's KV fits the KV
      budget (the rule of docs/engine.md, "Defaults from the model").
    max_num_batched_tokens: token budget of one step (decode tokens + prefill chunks).
    kv_budget_bytes: physical KV memory the store may map; None: what all slots at max_model_len
      need, capped at a quarter of the host's RAM for a host (CPU) store.
    device: "cpu", "cuda" or "cuda:N". dtype: activation/KV dtype (None: the model's).
    weights: how a GGUF model the engine loads keeps its weights: "quantized" (the Q4_0/Q4_1/
      Q8_0 blocks as stored, multiplied by the CPU kernel jvt_qmatmul: about 2.4x the decode
      speed of float32 on SmolLM2), "dense" (dequantized to dtype), or "auto" (the default:
      quantized on the CPU with tensor_parallel=1, dense otherwise). Only for models given by
      name or path; a loaded Model is used as it is.
    prefill_chunk: most prompt tokens of one sequence per step (chunked prefill).
    token_buckets / seq_buckets: the compiled step shapes (T packed tokens, S sequences); None
      derives 16, 64, 256, ... up to max_num_batched_tokens and 1, 4, 16, ... up to
      max_num_seqs. Pure-decode steps run in (S, S) shapes (one row per sequence), steps with
      prefill rows in (T, S(T)), S(T) the largest sequence bucket <= T (see step_shapes).
    decode_shapes: compile the (S, S) pure-decode shapes. False runs decode steps in the
      prefill shapes too: with one token bucket every step then has one shape, so a token's
      arithmetic (the CUDA kernels' KV split count) never depends on what else is batched.
    decode_steps: most decode iterations of one pure-decode step (every row a decode row): the
      compiled call runs up to K model steps on the device, each feeding its sampled tokens to
      the next, with per-row stops (EOS, stop_token_ids, max_tokens, context) on the device;
      1 turns it off. Steps are 1 while requests wait to be admitted (their time to first
      token never waits for a K-step call). None: DEFAULT_DECODE_STEPS of the device
      (docs/engine.md, "K decode steps per call").
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
    gpu_memory_utilization: on CUDA, the fraction of each device's memory the engine may use in
      all: XLA's pool (weights, activations) plus the KV chunks. Unless the XLA_PYTHON_CLIENT_*
      variables are set, XLA's pool grows on demand up to that fraction; the KV budget is
      what remains after the weights and the largest step's temporaries (jvt/memory.py).
    compilation_cache: keep compiled step shapes in JAX's persistent compilation cache so a
      second start loads them instead of compiling. compilation_cache_dir: its directory
      (None: <$JVT_CACHE_DIR or ~/.cache/jvt>/xla). The cache is process-wide in JAX: the first
      engine of a process that enables it sets the directory.
    """

    tensor_parallel: int = 1
    max_num_seqs: int = 16
    max_model_len: int | None = None
    max_num_batched_tokens: int = 512
    kv_budget_bytes: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    weights: str = "auto"
    prefill_chunk: int = 256
    token_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    decode_shapes: bool = True
    decode_steps: int | None = None
    preemption_mode: str = "swap"
    swap_space_bytes: int = 4 << 30
    enable_prefix_sharing: bool = True
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    compilation_cache: bool = True
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        for name in ("tensor_parallel", "max_num_seqs", "max_num_batched_tokens",
                     "prefill_chunk"):
            _positive_int(name, getattr(self, name))
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.decode_steps is None:
            object.__setattr__(self, "decode_steps",
                               DEFAULT_DECODE_STEPS["cpu" if self.device == "cpu" else "cuda"])
        _positive_int("decode_steps", self.decode_steps)
        if not isinstance(self.compilation_cache, bool):
            raise ValueError("EngineConfig.compilation_cache must be a bool, got "
                             f"{self.compilation_cache!r}")
        if self.compilation_cache_dir is not None and not isinstance(
                self.compilation_cache_dir, str):
            raise ValueError("EngineConfig.compilation_cache_dir must be None or a path str, "
                             f"got {self.compilation_cache_dir!r}")
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
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"EngineConfig.weights must be one of {WEIGHT_MODES}, got "
                             f"{self.weights!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"EngineConfig.preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        if not isinstance(self.decode_shapes, bool):
            raise ValueError(f"EngineConfig.decode_shapes must be a bool, got "
                             f"{self.decode_shapes!r}")
        if not isinstance(self.enable_prefix_sharing, bool):
            raise ValueError("EngineConfig.enable_prefix_sharing must be a bool, got "
                             f"{self.enable_prefix_sharing!r}")
        u = self.gpu_memory_utilization
        if not (isinstance(u, float) and 0.0 < u <= 1.0):
            raise ValueError("EngineConfig.gpu_memory_utilization must be a float in (0, 1], "
                             f"got {u!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): a step must fit one decode token of every sequence")
        tokens = self.token_buckets or _geometric_up_to(16, self.max_num_batched_tokens)
        seqs = self.seq_buckets or _geometric_up_to(1, self.max_num_seqs)
        object.__setattr__(self, "token_buckets", _buckets("token_buckets", tokens,
                                                           self.max_num_batched_tokens))
        object.__setattr__(self, "seq_buckets", _buckets("seq_buckets", seqs, self.max_num_seqs))

    @property
    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (T, S) shape the runner compiles, each in a greedy-only and a sampling variant.

        (S, S) for every sequence bucket: pure-decode steps, one row per sequence (on a CPU,
        compute scales with padded rows). (T, S(T)) for every token bucket T, S(T) the largest
        sequence bucket <= T: steps with prefill rows, whose sampled rows (S) cost little next
        to their T rows. A step of n tokens and m sequences runs in the smallest shape with
        T >= n and S >= m (see `bucket`); the largest token bucket always has S = max_num_seqs.
        """
        shapes = {(s, s) for s in self.seq_buckets} if self.decode_shapes else set()
        for t in self.token_buckets:
            below = [s for s in self.seq_buckets if s <= t]
            if below:
                shapes.add((t, below[-1]))
        return sorted(shapes)


def bucket(shapes: list[tuple[int, int]], num_tokens: int, num_seqs: int) -> tuple[int, int]:
    """The smallest (T, S) of sorted `shapes` with T >= num_tokens and S >= num_seqs."""
    for t, s in shapes:
        if t >= num_tokens and s >= num_seqs:
            return t, s
    raise ValueError(f"a step of {num_tokens} tokens and {num_seqs} sequences exceeds the "
                     f"largest step shape {shapes[-1]}")


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

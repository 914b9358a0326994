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


# -- the benchmark part: jvt's measured KV memory over the mixed workload, and the schemes ----

def shape_of(config) -> KVShape:
    import numpy as np

    return KVShape(config.num_layers, config.num_kv_heads, config.head_dim,
                   np.dtype(config.jnp_dtype).itemsize)


def kv_sample(engine) -> dict:
    """One step's KV state: tokens held per sequence (running and retained), the physical
    bytes jvt maps (chunks in use x chunk_bytes) and the bytes of those tokens."""
    st = engine.stats()
    sched = engine.scheduler
    lengths = [s.kv_valid for s in sched.running] + [len(r.tokens)
                                                     for r in sched.retained.values()]
    return {"lengths": lengths, "mapped": st["chunks_in_use"] * st["chunk_bytes"],
            "used": st["kv_used_bytes"]}


def run(report, smoke: bool) -> None:
    """KV bytes over the mixed workload's timeline: jvt as measured (engine stats each step)
    and every scheme computed on the same per-step lengths; then sequences per budget."""
    from bench.common import CheckError, Plot, log

    trace = report.shared.get("kv_trace")
    if trace is None:
        log("memory: no trace from the e2e part; running the mixed workload on jvt")
        trace = _own_trace(smoke)
    shape = shape_of(trace["config"])
    slots, max_len = trace["slots"], trace["max_len"]
    steps = trace["samples"]
    lengths = [s["lengths"] for s in steps]
    chunk = shape.chunk_bytes
    measured = [s["mapped"] for s in steps]
    if any(s["used"] != sum(s["lengths"]) * shape.token_bytes for s in steps):
        raise CheckError("engine stats' kv_used_bytes differ from the sampled lengths x "
                         "token_bytes: the trace is inconsistent")
    tl = timeline(lengths, shape, slots=slots, max_len=max_len)
    tl["jvt measured"] = measured
    live = tl["live"]
    t = report.table(f"KV memory over the mixed workload ({trace['model']}, "
                     f"{shape.token_bytes // 1024} KiB/token, {len(steps)} steps)",
                     ["scheme", "mean MiB", "peak MiB", "mean / live", "peak / live peak"])
    t.notes.append("live = tokens held x token_bytes; static = slots x max_len "
                   f"({slots} x {max_len}, the static engine's mixed-workload cache); jvt measured = chunks in use x {chunk >> 20} MiB "
                   "from engine stats each step; the others computed on the same lengths")
    mean_live, peak_live = _mean(live), max(live, default=0)
    for name, series in tl.items():
        t.add(name, _mean(series) / MiB, max(series, default=0) / MiB,
              _mean(series) / mean_live if mean_live else math.nan,
              max(series, default=0) / peak_live if peak_live else math.nan)
    xs = list(range(len(steps)))
    report.plots.append(Plot("kv_memory_timeline", f"KV memory, mixed workload "
                             f"({trace['model']})", "engine step", "MiB",
                             {k: (xs, [b / MiB for b in v]) for k, v in tl.items()}))
    if mean_live:
        report.headline_row("memory", "mean KV MiB over the workload", _mean(measured) / MiB,
                            "per-layer 2 MiB chunks (vTensor layout)",
                            _mean(tl["per_layer"]) / MiB, higher_is_better=False)
        report.headline_row("memory", "mean KV MiB over the workload", _mean(measured) / MiB,
                            f"static {slots} x {max_len}", _mean(tl["static"]) / MiB,
                            higher_is_better=False)
    budget = (64 * MiB) if smoke else (40 << 30)
    cap = report.table(f"Sequences that fit a {budget / (1 << 30):g} GiB KV budget "
                       f"({trace['model']}, static max_len {max_len})",
                       ["tokens per sequence", *[s for s in SCHEMES if s != "live"]])
    for n in sorted({16, 17, 97, 512, max_len // 2, max_len}):
        if n <= max_len:
            cap.add(n, *[max_concurrent(s, n, budget, shape, max_len=max_len)
                         for s in SCHEMES if s != "live"])
    n = min(512, max_len)
    fits = {s: max_concurrent(s, n, budget, shape, max_len=max_len) for s in SCHEMES}
    for peer in ("per_layer", "static"):
        report.headline_row("memory", f"sequences of {n} tokens in {budget / (1 << 30):g} GiB",
                            fits["jvt"], peer, fits[peer], higher_is_better=True)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _own_trace(smoke: bool) -> dict:
    from bench import e2e, workload
    from jvt.models import load

    plan = e2e.SMOKE[0] if smoke else e2e.FULL[0]
    model = load(plan.model, dtype=plan.dtype)
    reqs = workload.sharegpt_like(plan.mixed_n, rate=plan.mixed_rate, seed=0,
                                  max_prompt=plan.max_prompt, max_output=plan.max_output)
    engine = e2e.make_engine(model, plan, max(plan.batches))
    stats = []
    try:
        e2e.jvt_serve(engine, [(r.arrival_s, list(r.prompt.encode()), r.output_len)
                               for r in reqs], on_step=lambda e: stats.append(kv_sample(e)))
    finally:
        e2e.close_engine(engine)
    slots, max_len = e2e.static_mixed_shape(plan)
    return {"model": plan.model, "config": model.config, "samples": stats, "slots": slots,
            "max_len": max_len}

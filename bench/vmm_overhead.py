"""VMM overhead: decode step time when the step maps new KV chunks vs when it maps none.

A real decode step (the jvt NNX module's forward + logits + argmax over B sequences) runs over a
fresh KV store in three modes; all B sequences have the same length, so every
`tokens_per_chunk` steps each of them enters a new chunk in the same step (B chunk mappings at
once, the worst burst):
- ahead:    every slot reserved for the whole run beforehand: no step maps anything;
- inline:   reserve(slot, len + 1) right before each step: the background mapper races the
            step's dispatch and apply_pending() (the engine's, before dispatch) maps what is
            left on the critical path;
- prefetch: reserve(slot, len + 2) right after dispatching each step, so the mapper maps the
            next step's chunks while the device runs this one (how the engine reserves).
Each step is timed dispatch -> tokens on host. "boundary" steps are those whose new tokens
start new chunks; the mapping is hidden when their median equals the other steps' median.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Report, log, percentile

MODES = ("ahead", "inline", "prefetch")


def _setup(cfg, module, batch: int, start_len: int, max_tokens: int):
    from flax import nnx

    from jvt.kv import KVStore
    from jvt.types import AttnMeta

    gpu = jax.default_backend() == "gpu"
    store = KVStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, batch,
                    max_tokens, budget_bytes=batch * (max_tokens + 64) * 2 * cfg.num_layers
                    * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
                    + batch * (64 << 20), device="cuda:0" if gpu else "cpu")
    sid = store.store_id
    graphdef, state = nnx.split(module)
    weights, treedef = jax.tree.flatten(state)

    @jax.jit
    def greedy(weights, tokens, meta):
        """Greedy next token of each sequence (logits of its last row only)."""
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
        hidden = model(tokens, meta, store_id=sid)
        last = hidden[meta.seq_start[1:] - 1]
        return jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32)

    def step(tokens, meta):
        return greedy(weights, tokens, meta)

    def meta(lengths: np.ndarray, n_new: int) -> AttnMeta:
        starts = np.arange(batch + 1, dtype=np.int32) * n_new
        pos = (lengths[:, None] - n_new + np.arange(n_new)[None, :]).reshape(-1)
        return AttnMeta(positions=jnp.asarray(pos.astype(np.int32)),
                        seq_start=jnp.asarray(starts), seq_slot=jnp.arange(batch, dtype=jnp.int32),
                        seq_len=jnp.asarray(lengths.astype(np.int32)))

    lengths = np.full(batch, start_len, np.int64)
    for s in range(batch):
        store.reserve(s, start_len)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, 256, batch * start_len).astype(np.int32))
    tokens = step(prompt, meta(lengths, start_len))
    jax.block_until_ready(tokens)
    store.check()
    return store, step, meta, lengths, tokens


def run_mode(cfg, module, mode: str, batch: int, start_len: int, steps: int) -> dict:
    """Per-step seconds of `steps` decode steps in `mode`, split by chunk-boundary steps."""
    store, step, meta, lengths, tokens = _setup(cfg, module, batch, start_len,
                                                start_len + steps + 2)
    try:
        tpc = store.tokens_per_chunk
        if mode == "ahead":
            for s in range(batch):
                store.reserve(s, start_len + steps + 1)
            store.apply_pending()
        elif mode == "prefetch":
            for s in range(batch):
                store.reserve(s, start_len + 1)
        times, boundary = [], []
        warm = step(tokens, meta(lengths, 1))  # compile the decode shape
        jax.block_until_ready(warm)
        for _ in range(steps):
            lengths += 1
            if mode == "inline":
                for s in range(batch):
                    store.reserve(s, int(lengths[s]))
            m = meta(lengths, 1)
            t0 = time.perf_counter()
            store.apply_pending()  # as the runner does before every dispatch
            out = step(tokens, m)
            if mode == "prefetch":
                for s in range(batch):
                    store.reserve(s, int(lengths[s]) + 1)
            tokens = jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            boundary.append(int(lengths[0] - 1) % tpc == 0)
        store.check()
    finally:
        store.close()
    times, boundary = np.array(times), np.array(boundary)
    return {"tokens_per_chunk": tpc, "boundary": times[boundary].tolist(),
            "other": times[~boundary].tolist()}


def run(report: Report, smoke: bool) -> None:
    import dataclasses

    from jvt.models import init_module, load
    from jvt.models.presets import preset_config

    if smoke:  # tiny with 8 KV heads of 128: 32 KiB per token, 64 tokens per chunk
        name = "tiny (8 kv heads x 128)"
        cfg = dataclasses.replace(preset_config("tiny"), num_heads=8, num_kv_heads=8,
                                  head_dim=128)
        module, batch, start_len = init_module(cfg), 4, 60
    else:
        name = "llama-3.2-1b"
        model = load(name)
        cfg, module, batch, start_len = model.config, model.module, 64, 1000
    table = report.table(f"VMM overhead: decode step of {name}, {batch} sequences from "
                         f"{start_len} tokens, all entering new chunks together",
                         ["mode", "chunks mapped per boundary step", "boundary steps",
                          "boundary ms p50", "other ms p50", "boundary - other ms",
                          "excess over ahead ms", "excess % of step"])
    table.notes.append(" ".join(__doc__.split("\n\n")[0].split()))
    table.notes.append("excess over ahead: (boundary - other) minus the same difference in "
                       "'ahead', which maps nothing (the control for step-to-step variation)")
    diffs = {}
    for mode in MODES:
        r = run_mode(cfg, module, mode, batch, start_len, steps := 3 * _tpc(cfg) + 8)
        b, o = percentile(r["boundary"], 50), percentile(r["other"], 50)
        log(f"vmm {mode}: {steps} steps, boundary {b * 1e3:.3f} ms, other {o * 1e3:.3f} ms")
        diffs[mode] = b - o
        excess = diffs[mode] - diffs["ahead"]
        table.add(mode, batch if mode != "ahead" else 0, len(r["boundary"]), b * 1e3, o * 1e3,
                  diffs[mode] * 1e3, excess * 1e3, 100 * excess / o)
    rows = {r[0]: r for r in table.rows}
    for mode in ("inline", "prefetch"):
        report.headline_row("vmm overhead", f"excess ms of a step mapping {batch} chunks "
                            f"({mode})", rows[mode][6], "step time ms", rows[mode][4],
                            higher_is_better=None)


def _tpc(cfg) -> int:
    tb = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
    return math.lcm(2 << 20, tb) // tb

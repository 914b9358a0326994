"""VMM costs of the KV store: `python bench/vmm.py [--device cuda:0|cpu] [--json PATH]`.

Measures, per backend (CUDA VMM on a GPU, memfd + mmap on the host):
  - map latency per chunk with fresh chunks (create + map + access) and with pool chunks
    (map + access only), for runs of 1, 16 and 128 chunks, synchronously on the caller;
  - unmap latency per chunk (release after everything retired unmaps at once);
  - reserve-to-mapped latency through the background mapper (native poll of the capacity table);
  - apply_pending() with nothing pending, from a tight Python loop and from a native loop;
  - chunks mapped per second (128-chunk runs from the pool).
Prints a markdown table; `--json PATH` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

TOKEN_HEAD_DIM = 4096  # float32, 1 layer x 1 head: 32 KiB per token, 64 tokens per 2 MiB chunk


def _store(device: str, slots: int, chunks_per_slot: int, budget_chunks: int):
    from jvt.kv import KVStore

    probe = KVStore(1, 1, TOKEN_HEAD_DIM, "float32", 1, 1, 1 << 30, device)
    chunk, tpc = probe.chunk_bytes, probe.tokens_per_chunk
    probe.close()
    s = KVStore(1, 1, TOKEN_HEAD_DIM, "float32", slots, chunks_per_slot * tpc,
                budget_chunks * chunk, device)
    return s, tpc


def _cycle(s, slot: int, step: int) -> int:
    """Release `slot` and retire at once (nothing is in flight in this benchmark)."""
    s.fence(step)
    s.release(slot)
    s.retire(step)
    return step + 1


def measure(device: str, reps: int) -> list[dict]:
    """Run every measurement on `device`; one dict per table row."""
    rows: list[dict] = []

    def row(metric: str, value: float, unit: str, note: str = "") -> None:
        rows.append({"metric": metric, "value": value, "unit": unit, "note": note})

    max_run = 128
    s, tpc = _store(device, slots=2, chunks_per_slot=max_run, budget_chunks=max_run)
    n = s._native
    step = 0
    with s:
        for run in (1, 16, max_run):
            # Fresh: a new store each rep would re-reserve address space; instead measure the
            # first mapping of never-created chunks once per run size on its own store.
            fresh_s, _ = _store(device, slots=1, chunks_per_slot=run, budget_chunks=run)
            with fresh_s:
                t = fresh_s._native._bench_reserve_apply(0, run * tpc)
            row(f"map, fresh chunks (create+map+access), run of {run}", t / run / 1e3,
                "us/chunk", "one sample")
            samples, unmaps = [], []
            for _ in range(reps):
                samples.append(n._bench_reserve_apply(0, run * tpc))
                t0 = time.perf_counter()
                step = _cycle(s, 0, step)
                unmaps.append(time.perf_counter() - t0)
            row(f"map, pool chunks (map+access), run of {run}",
                statistics.median(samples) / run / 1e3, "us/chunk", f"median of {reps}")
            row(f"unmap (release+retire), run of {run}",
                statistics.median(unmaps) / run * 1e6, "us/chunk", f"median of {reps}, Python")
            if run == max_run:
                row("chunks mapped per second (pool, 128-chunk runs)",
                    run / (statistics.median(samples) / 1e9), "chunks/s")

        lat = []
        for _ in range(reps):
            lat.append(n._bench_reserve_to_mapped(1, tpc))
            step = _cycle(s, 1, step)
        row("reserve -> mapped by the background mapper, 1 chunk", statistics.median(lat) / 1e3,
            "us", f"median of {reps}; p90 {sorted(lat)[int(0.9 * (reps - 1))] / 1e3:.1f} us")

        s.reserve(0, tpc)
        s.apply_pending()
        calls = 1_000_000
        t0 = time.perf_counter()
        for _ in range(calls):
            s.apply_pending()
        py_ns = (time.perf_counter() - t0) / calls * 1e9
        row("apply_pending(), nothing pending, Python loop", py_ns, "ns/call",
            "includes the Python call")
        row("apply_pending(), nothing pending, native loop", n._bench_apply_pending(50_000_000),
            "ns/call", "target < 1000 ns")
    return rows


def markdown(device: str, rows: list[dict]) -> str:
    lines = [f"### KV store VMM costs ({device})", "", "| metric | value | unit | note |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['value']:.4g} | {r['unit']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def default_device() -> str:
    from jvt.kv import cuda_available

    if cuda_available():
        import jax

        jax.devices()  # JAX owns the primary context and its memory pool first, as in the engine
        return "cuda:0"
    return "cpu"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 if present)")
    ap.add_argument("--reps", type=int, default=50, help="samples per measurement")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps={args.reps} must be >= 1")
    device = args.device or default_device()
    rows = measure(device, args.reps)
    print(markdown(device, rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

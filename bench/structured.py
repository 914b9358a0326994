"""Structured outputs: schema compile time, mask time per token, and the decode rate of
schema-constrained requests against unconstrained ones (SmolLM2 on the CPU, batch 8).

    python -m bench.structured --json out.json [--model smollm2-135m] [--repeats 3]

compile: llguidance grammar + matcher of each schema, and of the tool-call grammar of TOOLS
(tool_choice "required", SmolLM2's hermes_list format), cache cleared (median of 5). mask: the
host time of Constrainer.masks per constrained row and step during the constrained runs.
Refused: the K-step draws made without the mask that the host refused, per constrained
token. Rate: 8 chat requests decoding to 96 new tokens (constrained: a JSON schema whose string field
takes up to 400 characters, so that outputs run to max_tokens like the unconstrained ones,
which ignore EOS), tok/s after each request's first token, median of the repeats, the engines
alternated. Unconstrained runs with the engine's default decode_steps and with 1 (constrained
calls read the previous call back first and run the K their refusal rate gives, see
jvt.scheduler.refusal_steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from bench.common import decode_rate

SCHEMAS = {
    "flat": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
             "required": ["a", "b"]},
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["city"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["name", "tags", "address"]},
    "long_text": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "minLength": 400, "maxLength": 400}},
        "required": ["title", "story"], "additionalProperties": False},
}
TOOLS = [{"name": "get_weather", "parameters": {
              "type": "object", "properties": {"city": {"type": "string"},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city"]}},
         {"name": "search", "parameters": {
              "type": "object", "properties": {"query": {"type": "string"},
                                               "limit": {"type": "integer", "minimum": 1}},
              "required": ["query"]}}]
BATCH = 8
NEW_TOKENS = 96
MESSAGES = [{"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": "Write a title and a story about the sea."}]


def compile_times(tokenizer, vocab: int, eos: tuple[int, ...]) -> dict[str, float]:
    from jvt import structured, tools
    from jvt.types import SamplingParams

    c = structured.Constrainer(tokenizer, vocab, eos)
    calls = tools.call_grammar([tools.Tool(t["name"], None, t["parameters"]) for t in TOOLS],
                               True, tools.HERMES_LIST)
    constraints = {name: SamplingParams(json_schema=schema) for name, schema in SCHEMAS.items()}
    constraints["tool calls"] = SamplingParams(grammar=calls)
    out = {}
    for name, params in constraints.items():
        times = []
        for _ in range(5):
            structured.grammar.cache_clear()
            t = time.perf_counter()
            c.matcher(params)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def _rate(engine, prompt: list[int], params) -> float:
    handles = [engine.add_request(prompt, params) for _ in range(BATCH)]
    while engine.has_unfinished():
        engine.step()
    return decode_rate([h.output() for h in handles])


def measure(model: str, repeats: int) -> dict:
    import jvt
    from jvt import config, structured

    opts = {"max_num_seqs": BATCH, "max_model_len": 1024, "max_num_batched_tokens": 256,
            "token_buckets": (16, 256), "seq_buckets": (1, BATCH)}
    k_default = config.DEFAULT_DECODE_STEPS["cpu"]
    engines = {"constrained": jvt.Engine(model, **opts),
               f"unconstrained K={k_default}": jvt.Engine(model, **opts),
               "unconstrained K=1": jvt.Engine(model, decode_steps=1, **opts)}
    tok = engines["constrained"].tokenizer
    prompt = tok.apply_chat_template(MESSAGES)
    constrained = jvt.SamplingParams(temperature=0.8, seed=1, max_tokens=NEW_TOKENS,
                                     json_schema=SCHEMAS["long_text"])
    free = jvt.SamplingParams(temperature=0.8, seed=1, max_tokens=NEW_TOKENS, ignore_eos=True)
    mask_times: list[float] = []
    engines["constrained"].generate([prompt], constrained, use_tqdm=False)  # the masked variant
    c = engines["constrained"]._constrainer()
    fill = c.masks

    def timed(rows, s):
        t = time.perf_counter()
        out = fill(rows, s)
        if rows:
            mask_times.append((time.perf_counter() - t) / len(rows))
        return out
    c.masks = timed
    runs: dict[str, list[float]] = {name: [] for name in engines}
    refused = engines["constrained"].refused_draws
    for _ in range(repeats):
        for name, e in engines.items():
            runs[name].append(_rate(e, prompt, constrained if name == "constrained" else free))
    refused = engines["constrained"].refused_draws - refused
    vocab = engines["constrained"].model.config.vocab_size
    result = {"compile_ms": compile_times(tok, vocab, tok.eos_ids),
              "mask_us_per_row_median": statistics.median(mask_times) * 1e6,
              "mask_us_per_row_p99": sorted(mask_times)[int(0.99 * (len(mask_times) - 1))] * 1e6,
              "refused_per_token": refused / (repeats * BATCH * NEW_TOKENS),
              "rates": {name: statistics.median(r) for name, r in runs.items()},
              "runs": runs}
    for e in engines.values():
        e.close()
    structured.grammar.cache_clear()
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    r = measure(args.model, args.repeats)
    import jax

    r["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "model": args.model, "jax": jax.__version__,
                 "python": platform.python_version(), "cores": os.cpu_count()}
    with open(args.json, "w") as f:
        json.dump(r, f, indent=1)
    print(r["meta"])
    print("| schema | compile ms |\n|---|---|")
    for name, ms in r["compile_ms"].items():
        print(f"| {name} | {ms:.2f} |")
    print(f"\nmask per constrained row and step: median {r['mask_us_per_row_median']:.0f} us, "
          f"p99 {r['mask_us_per_row_p99']:.0f} us; draws refused by the host (K-step calls): "
          f"{r['refused_per_token']:.3f} per constrained token\n")
    base = r["rates"]["constrained"]
    print("| requests (batch 8) | tok/s | constrained / this |\n|---|---|---|")
    for name, rate in r["rates"].items():
        print(f"| {name} | {rate:.0f} | {base / rate:.2f} |")


if __name__ == "__main__":
    main()

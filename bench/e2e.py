"""End-to-end generation: jvt's Engine vs a static max-length-cache JAX engine and HF
transformers, on the same random bf16 weights of the llama-3.2-1b and llama-3-8b presets.

(a) batch sweep: B prompts of fixed length, fixed output length (EOS ignored), all at t = 0;
(b) mixed workload: ShareGPT-like lengths with Poisson arrivals (bench/workload.py).
Metrics: output tokens/s (all output tokens / time from the first arrival to the last token),
TTFT (first token on the host - scheduled arrival) and ITL (gaps between a request's tokens),
p50 and p99. Before timing, each baseline's greedy tokens are checked against jvt's on a short
prompt (teacher-forced: every jvt token must be the baseline's argmax, or within `tol` logits of
it where numerics may flip near-ties).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time

import jax
import numpy as np

from bench import memory, workload
from bench.common import CheckError, Plot, Report, log, percentile


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    dtype: str | None  # None: the preset's
    batches: tuple[int, ...]
    static_batches: tuple[int, ...]
    hf_batches: tuple[int, ...]
    prompt_len: int
    output_len: int
    mixed_n: int
    mixed_rate: float  # requests/s
    max_prompt: int
    max_output: int
    kv_budget_gib: float
    check_tol: float  # logits a near-tie may differ by (bf16 numerics)
    token_buckets: tuple[int, ...] | None  # jvt's compiled step shapes (None: its defaults)
    seq_buckets: tuple[int, ...] | None


# Sizes for the ~8 minute budget on one H100: every jvt step shape is compiled when the engine
# starts, so the buckets are few (decode batches of the sweep, one prefill-sized bucket). The
# static engine stops at 64 slots for 8B: at 256 its cache and prefill activations did not fit
# in XLA's pool next to the weights (H100, XLA_PYTHON_CLIENT_MEM_FRACTION 0.5, 2026-11-24), and
# XLA's allocator retried instead of failing.
FULL = (
    Plan("llama-3.2-1b", None, (1, 16, 64, 256), (1, 16, 64, 256), (1, 16, 64, 256), 256, 128,
         128, 16.0, 1024, 256, 8.0, 1.0, (16, 64, 256, 1024), (1, 16, 64, 256)),
    Plan("llama-3-8b", None, (1, 16, 64, 256), (1, 16, 64), (1, 16, 64), 256, 128,
         64, 4.0, 1024, 256, 16.0, 1.0, (16, 64, 256, 1024), (1, 16, 64, 256)),
)
SMOKE = (Plan("tiny", None, (1, 3), (1, 3), (1, 3), 12, 6, 6, 50.0, 40, 12, 0.25, 1e-3,
              None, None),)
CHECK_PROMPT_LEN, CHECK_TOKENS = 24, 8


@dataclasses.dataclass
class Timed:
    """One request's schedule and result (perf_counter seconds)."""

    arrival: float  # scheduled arrival, absolute
    token_times: list[float]
    token_ids: list[int]


def summarize(timed: list[Timed], start: float) -> dict[str, float]:
    """tokens/s, TTFT and ITL percentiles (ms) of a run that started at `start`."""
    n_out = sum(len(t.token_times) for t in timed)
    end = max(t.token_times[-1] for t in timed if t.token_times)
    ttft = [t.token_times[0] - t.arrival for t in timed if t.token_times]
    itl = [b - a for t in timed for a, b in zip(t.token_times, t.token_times[1:])]
    return {"tok/s": n_out / (end - start),
            "TTFT p50 ms": 1e3 * percentile(ttft, 50), "TTFT p99 ms": 1e3 * percentile(ttft, 99),
            "ITL p50 ms": 1e3 * percentile(itl, 50), "ITL p99 ms": 1e3 * percentile(itl, 99)}


def device() -> str:
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def fixed_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 255, length).tolist() for _ in range(n)]


# -- jvt ------------------------------------------------------------------------------------

def make_engine(model, plan: Plan, max_seqs: int):
    from jvt import Engine

    buckets = {}
    if plan.token_buckets is not None:
        buckets = {"token_buckets": plan.token_buckets, "seq_buckets": plan.seq_buckets,
                   "max_num_batched_tokens": plan.token_buckets[-1]}
    return Engine(model, max_num_seqs=max_seqs, max_model_len=max_model_len(plan),
                  kv_budget_bytes=int(plan.kv_budget_gib * (1 << 30)), device=device(),
                  enable_prefix_sharing=False, **buckets)


def max_model_len(plan: Plan) -> int:
    need = max(plan.prompt_len + plan.output_len, plan.max_prompt + plan.max_output,
               CHECK_PROMPT_LEN + CHECK_TOKENS)
    return 1 << (need - 1).bit_length()


def _greedy(n: int):
    from jvt import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def submit(engine, prompt: list[int], params):
    """Queue one request without blocking; returns a handle with .finished and .output().

    jvt.Engine has no public non-blocking submit yet (generate() blocks until its batch is
    done), so this queues exactly as generate() does, through its private _check/_add."""
    add = getattr(engine, "add_request", None)
    if add is not None:
        return add(prompt, params)
    return engine._add(*engine._check(prompt, params, "prompt"))


def jvt_serve(engine, requests: list[tuple[float, list[int], int]], on_step=None
              ) -> tuple[list[Timed], float]:
    """Submit each (arrival_s, prompt ids, output_len) request at its arrival time and step
    the engine until all finish; on_step(engine) runs after every step.
    Returns (results in request order, start time)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    pending: dict[object, int] = {}  # request handle -> index
    outputs: dict[int, object] = {}
    start = time.perf_counter()
    nxt = 0
    while nxt < len(order) or pending:
        now = time.perf_counter() - start
        while nxt < len(order) and requests[order[nxt]][0] <= now:
            i = order[nxt]
            nxt += 1
            pending[submit(engine, requests[i][1], _greedy(requests[i][2]))] = i
        if not pending:
            time.sleep(max(0.0, requests[order[nxt]][0] - now))
            continue
        engine.step()
        if on_step is not None:
            on_step(engine)
        for handle in [h for h in pending if h.finished]:
            outputs[pending.pop(handle)] = handle.output()
    timed = [Timed(start + requests[i][0], list(outputs[i].metrics.token_times),
                   list(outputs[i].token_ids)) for i in range(len(requests))]
    return timed, start


# -- the correctness gate -------------------------------------------------------------------

def check_tokens(name: str, prompt: list[int], tokens: list[int], score, tol: float) -> str:
    """Teacher-forced check of jvt's greedy `tokens` under a baseline's logits.

    score(ids) -> logits [len(ids), V]. Raises CheckError when a jvt token is more than `tol`
    below the baseline's best logit; returns a one-line summary."""
    first = len(prompt) - 1  # the row predicting tokens[0]
    logits = np.asarray(score(prompt + tokens[:-1]), np.float32)[first:first + len(tokens)]
    gaps = logits.max(axis=-1) - logits[np.arange(len(tokens)), tokens]
    same = int(np.sum(logits.argmax(axis=-1) == np.asarray(tokens)))
    if gaps.max() > tol:
        raise CheckError(f"{name}: jvt's greedy token {int(np.argmax(gaps))} is "
                         f"{gaps.max():.3g} logits below {name}'s best (allowed {tol})")
    return f"{name}: {same}/{len(tokens)} greedy tokens identical, max logit gap {gaps.max():.3g}"


# -- one model ------------------------------------------------------------------------------

def run_model(report: Report, plan: Plan, sweep, mixed, notes: list[str]) -> None:
    from jvt.models import load

    log(f"e2e {plan.model}: loading random weights")
    model = load(plan.model, dtype=plan.dtype)
    cfg = model.config
    check_prompt = fixed_prompts(1, CHECK_PROMPT_LEN, seed=1)[0]
    reqs = workload.sharegpt_like(plan.mixed_n, rate=plan.mixed_rate, seed=0,
                                  max_prompt=plan.max_prompt, max_output=plan.max_output)
    mixed_reqs = [(r.arrival_s, list(r.prompt.encode()), r.output_len) for r in reqs]

    # jvt
    engine = make_engine(model, plan, max(plan.batches))
    try:
        ref_tokens, _ = jvt_serve(engine, [(0.0, check_prompt, CHECK_TOKENS)])
        ref_tokens = ref_tokens[0].token_ids
        for b in plan.batches:
            sweep_point(report, sweep, plan, "jvt", b, lambda reqs: jvt_serve(engine, reqs))
        trace = []
        log(f"e2e {plan.model} jvt mixed workload ({plan.mixed_n} requests)")
        timed, start = jvt_serve(engine, mixed_reqs,
                                 on_step=lambda e: trace.append(memory.kv_sample(e)))
        mixed.add(plan.model, "jvt", *summarize(timed, start).values())
        slots, max_len = static_mixed_shape(plan)
        report.shared["kv_trace"] = {"model": plan.model, "config": cfg, "samples": trace,
                                     "slots": slots, "max_len": max_len}
    finally:
        close_engine(engine)
        gc.collect()

    if not report.out_of_time("e2e", f"{plan.model} static engine"):
        run_static(report, plan, model, check_prompt, ref_tokens, mixed_reqs, sweep, mixed,
                   notes)
        gc.collect()
    if not report.out_of_time("e2e", f"{plan.model} HF transformers"):
        run_hf(report, plan, model, check_prompt, ref_tokens, sweep, notes)
    report.skip("e2e", f"{plan.model} HF mixed workload",
                "HF generate serves one static batch: no arrivals or continuous batching")
    del model
    gc.collect()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def static_mixed_shape(plan: Plan) -> tuple[int, int]:
    """(slots, max_len) of the static engine's mixed-workload cache: as many slots as its
    largest sweep batch, max_len = the longest possible request rounded up to 128."""
    return max(plan.static_batches), round_up(plan.max_prompt + plan.max_output, 128)


def run_static(report, plan, model, check_prompt, ref_tokens, mixed_reqs, sweep, mixed,
               notes) -> None:
    """The static engine: greedy check, sweep, mixed workload. Its cache is sized as a
    static server would be: max_len = the longest request of the run (rounded to 128)."""
    from bench.static_engine import StaticEngine

    slots, mixed_len = static_mixed_shape(plan)
    impl = None
    try:
        impl = _static_impl(model.module, check_prompt, notes)
        se = StaticEngine(model.module, slots=1, impl=impl,
                          max_len=round_up(CHECK_PROMPT_LEN + CHECK_TOKENS, 128))
        notes.append(check_tokens(f"static ({plan.model})", check_prompt, ref_tokens,
                                  lambda ids: se.prefill(0, ids), plan.check_tol))
        served = se.serve([(0.0, check_prompt, CHECK_TOKENS)])[0].token_ids
        same = sum(a == b for a, b in zip(served, ref_tokens))
        notes.append(f"static ({plan.model}, {se.impl} attention): its own greedy decode "
                     f"matches jvt on {same}/{CHECK_TOKENS} tokens")
    except Exception as e:  # noqa: BLE001 - CheckError or a failing attention backend
        report.skip("e2e", f"{plan.model} static engine",
                    f"{'WRONG OUTPUT' if isinstance(e, CheckError) else 'failed'}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return
    sweep_len = round_up(plan.prompt_len + plan.output_len, 128)
    for b in plan.static_batches:
        se = None
        try:
            se = StaticEngine(model.module, slots=b, max_len=sweep_len, impl=impl)
            se.warmup([plan.prompt_len])
        except Exception as e:  # noqa: BLE001 - e.g. the max_len cache does not fit
            report.skip("e2e", f"{plan.model} static batch {b}",
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        sweep_point(report, sweep, plan, "static", b, lambda reqs, se=se: _static(se, reqs))
        se = None
        gc.collect()
    try:
        se = StaticEngine(model.module, slots=slots, max_len=mixed_len, impl=impl)
        log(f"e2e {plan.model} static mixed workload ({slots} slots x {mixed_len})")
        se.warmup([len(p) for _, p, _ in mixed_reqs])
        mixed.add(plan.model, f"static ({slots} slots)",
                  *summarize(*_static(se, mixed_reqs)).values())
    except Exception as e:  # noqa: BLE001 - e.g. out of memory for the max_len cache
        report.skip("e2e", f"{plan.model} static mixed",
                    f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


def _static_impl(module, prompt: list[int], notes: list[str]) -> str:
    """The static engine's attention: its default (cuDNN on GPU) when a prefill and a decode
    step run with it, else XLA (noted in the report)."""
    from bench.static_engine import StaticEngine, default_impl

    impl = default_impl()
    if impl == "xla":
        return impl
    try:
        StaticEngine(module, slots=2, max_len=128, impl=impl).serve([(0.0, prompt, 2)])
        return impl
    except Exception as e:  # noqa: BLE001 - cuDNN may reject a shape or a mask
        notes.append(f"static engine: {impl} attention failed ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}); using XLA attention instead")
        return "xla"


def _static(se, reqs) -> tuple[list[Timed], float]:
    out = se.serve(reqs)
    return [Timed(o.arrival, o.token_times, o.token_ids) for o in out], \
        min(o.arrival for o in out)


def close_engine(engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def run_hf(report, plan, model, check_prompt, ref_tokens, sweep, notes) -> None:
    from bench import hf_baseline

    try:
        import torch
    except ImportError as e:
        report.skip("e2e", f"{plan.model} HF", f"torch not importable: {e}")
        return
    if device() == "cuda" and not torch.cuda.is_available():
        report.skip("e2e", f"{plan.model} HF", "torch has no CUDA here")
        return
    hf = None
    try:
        log(f"e2e {plan.model}: building HF LlamaForCausalLM")
        hf = hf_baseline.build(model.config, model.module)
        notes.append(check_tokens(f"HF ({plan.model})", check_prompt, ref_tokens,
                                  lambda ids: hf_baseline.score(hf, ids), plan.check_tol))
        for b in plan.hf_batches:
            prompts = fixed_prompts(b, plan.prompt_len, seed=b)
            log(f"e2e {plan.model} HF batch {b}")
            hf_baseline.generate(hf, prompts, 2)  # warm-up at this batch's shapes
            _, ttft = hf_baseline.generate(hf, prompts, 1)
            _, total = hf_baseline.generate(hf, prompts, plan.output_len)
            itl = (total - ttft) / max(1, plan.output_len - 1)
            sweep.add(plan.model, "HF transformers", b, b * plan.output_len / total,
                      1e3 * ttft, 1e3 * ttft, 1e3 * itl, math.nan)
    except CheckError as e:
        report.skip("e2e", f"{plan.model} HF", f"WRONG OUTPUT: {e}")
    except Exception as e:  # noqa: BLE001 - a failing baseline must not end the run
        report.skip("e2e", f"{plan.model} HF", f"failed: {type(e).__name__}: {e}"[:300])
    finally:
        hf = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def sweep_point(report, sweep, plan: Plan, engine_name: str, b: int, serve) -> None:
    prompts = fixed_prompts(b, plan.prompt_len, seed=b)
    reqs = [(0.0, p, plan.output_len) for p in prompts]
    try:
        log(f"e2e {plan.model} {engine_name} batch {b}")
        serve([(0.0, p, 2) for p in prompts])  # warm-up: compiles this batch's step shapes
        timed, start = serve(reqs)
    except Exception as e:  # noqa: BLE001 - e.g. a static cache that does not fit memory
        report.skip("e2e", f"{plan.model} {engine_name} batch {b}",
                    f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return
    s = summarize(timed, start)
    sweep.add(plan.model, engine_name, b, s["tok/s"], s["TTFT p50 ms"], s["TTFT p99 ms"],
              s["ITL p50 ms"], s["ITL p99 ms"])


def run(report: Report, smoke: bool) -> None:
    plans = SMOKE if smoke else FULL
    p0 = plans[0]
    sweep = report.table(f"End-to-end batch sweep (prompt {p0.prompt_len}, output "
                         f"{p0.output_len} tokens, greedy, EOS ignored)",
                         ["model", "engine", "batch", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                          "ITL p50 ms", "ITL p99 ms"])
    sweep.notes.append("HF: TTFT = generate(1 new token); ITL = (generate(n) - TTFT) / (n-1); "
                       "no per-token times, so no p99")
    mixed = report.table(f"End-to-end mixed workload (ShareGPT-like, Poisson arrivals; "
                         f"{', '.join(f'{p.model}: {p.mixed_n} requests at {p.mixed_rate}/s' for p in plans)})",
                         ["model", "engine", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                          "ITL p50 ms", "ITL p99 ms"])
    for plan in plans:
        if report.out_of_time("e2e", plan.model):
            continue
        try:
            run_model(report, plan, sweep, mixed, sweep.notes)
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the other
            report.skip("e2e", plan.model, f"failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}")
        report.write()  # keep what this model measured if the run is cut short
    _headlines(report, sweep, mixed, plans)
    for plan in plans:
        series = {}
        for row in sweep.rows:
            if row[0] == plan.model:
                xs, ys = series.setdefault(row[1], ([], []))
                xs.append(row[2])
                ys.append(row[3])
        report.plots.append(Plot(f"e2e_sweep_{plan.model}", f"{plan.model}: output tokens/s",
                                 "batch", "tokens/s", series, logx=True, logy=True))


def _headlines(report, sweep, mixed, plans) -> None:
    for plan in plans:
        rows = [r for r in sweep.rows if r[0] == plan.model]
        b = max((r[2] for r in rows if r[1] == "jvt"), default=None)
        jvt = {r[1]: r for r in rows if r[2] == b}
        for peer in ("static", "HF transformers"):
            if "jvt" in jvt and peer in jvt:
                report.headline_row(f"e2e {plan.model}", f"tok/s at batch {b}", jvt["jvt"][3],
                                    peer, jvt[peer][3], higher_is_better=True)
        m = {r[1].split(" (")[0]: r for r in mixed.rows if r[0] == plan.model}
        if "jvt" in m and "static" in m:
            report.headline_row(f"e2e {plan.model} mixed", "tok/s", m["jvt"][2], m["static"][1],
                                m["static"][2], higher_is_better=True)
            report.headline_row(f"e2e {plan.model} mixed", "TTFT p99 ms", m["jvt"][4],
                                m["static"][1], m["static"][4], higher_is_better=False)

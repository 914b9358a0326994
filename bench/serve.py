"""Online serving benchmark (the role of ``vllm bench serve``): a random or ShareGPT-like
workload (bench/workload.py) sent as streamed /v1/completions requests, at a Poisson request
rate or all at once, under a fixed concurrency limit; prints request/s, output tok/s, TTFT,
TPOT, ITL and end-to-end latency (mean, median, p99) and writes them as JSON.

    python -m bench.serve --url http://127.0.0.1:8000 --model NAME [--dataset sharegpt] ...
        benchmarks any OpenAI-compatible server.
    python -m bench.serve --model tiny [engine options, as for jvt serve] ...
        starts ``python -m jvt serve`` with those options, benchmarks it over HTTP, then runs
        the same workload on an in-process Engine with the same options (add_request/step,
        same arrivals and concurrency) and reports HTTP / in-process throughput.

As a part of ``python -m bench`` (``run(report, smoke)``) it runs the comparison at
concurrency 16. Every request is greedy with EOS ignored, so it generates exactly its output
length. TTFT and ITL come from the stream chunks' arrival (HTTP) or the engine's token times
(in-process); TPOT is (latency - TTFT) / (output tokens - 1) per request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np

from bench import workload
from bench.common import Report, Table, log, percentile

REQUEST_TIMEOUT_S = 600.0


@dataclasses.dataclass
class Sample:
    """What one request measured (seconds)."""

    prompt_tokens: int
    output_tokens: int
    ttft: float
    itl: list[float]
    latency: float
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    dataset: str  # "random" or "sharegpt"
    num_prompts: int
    request_rate: float  # requests/s (Poisson); inf: all at once
    max_concurrency: int
    input_len: int  # random: every prompt's length; sharegpt: the cap
    output_len: int  # random: every output's length; sharegpt: the cap
    seed: int = 0


def make_workload(plan: Plan) -> list[workload.Request]:
    if plan.dataset == "sharegpt":
        return workload.sharegpt_like(plan.num_prompts, rate=plan.request_rate, seed=plan.seed,
                                      max_prompt=plan.input_len, max_output=plan.output_len)
    if plan.dataset != "random":
        raise ValueError(f"dataset must be 'random' or 'sharegpt', got {plan.dataset!r}")
    rng = np.random.default_rng(plan.seed)
    n = plan.num_prompts
    gaps = np.zeros(n) if math.isinf(plan.request_rate) else rng.exponential(
        1.0 / plan.request_rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [workload.Request(float(a), workload.text(rng, plan.input_len), plan.input_len,
                             plan.output_len) for a in arrivals]


def summarize(samples: list[Sample], duration_s: float, cpu_s: float = math.nan) -> dict:
    """vLLM's summary: throughputs and mean/median/p99 of TTFT, TPOT, ITL, E2E (ms), plus the
    CPU time spent per output token (``cpu_s``: all processes involved; nan when unknown)."""
    ok = [s for s in samples if s.error is None]
    out_tokens = sum(s.output_tokens for s in ok)
    in_tokens = sum(s.prompt_tokens for s in ok)
    summary = {
        "completed": len(ok), "failed": len(samples) - len(ok), "duration_s": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "cpu_ms_per_output_token": 1e3 * cpu_s / max(1, out_tokens),
    }
    series = {
        "ttft": [s.ttft for s in ok],
        "tpot": [(s.latency - s.ttft) / (s.output_tokens - 1) for s in ok if s.output_tokens > 1],
        "itl": [g for s in ok for g in s.itl],
        "e2el": [s.latency for s in ok],
    }
    for name, values in series.items():
        summary[f"mean_{name}_ms"] = 1e3 * float(np.mean(values)) if values else math.nan
        summary[f"median_{name}_ms"] = 1e3 * percentile(values, 50)
        summary[f"p99_{name}_ms"] = 1e3 * percentile(values, 99)
    errors = [s.error for s in samples if s.error is not None]
    if errors:
        summary["first_error"] = errors[0]
    return summary


# -- over HTTP -----------------------------------------------------------------------------
# A minimal HTTP/1.1 client on asyncio streams rather than httpx: on a small machine the
# client's CPU time comes out of the server's, and httpx's layers cost about 0.1 ms of CPU per
# streamed chunk (vLLM's benchmark uses aiohttp's C parser for the same reason).

class _Endpoint:
    """Where the requests go: /v1/completions under ``url`` (http or https)."""

    def __init__(self, url: str, api_key: str | None):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--url must be http://host[:port] or https://..., got {url!r}")
        self.host, self.tls = u.hostname, u.scheme == "https"
        self.port = u.port or (443 if self.tls else 80)
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.head = (f"POST {u.path.rstrip('/')}/v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
                     f"Content-Type: application/json\r\nConnection: close\r\n{auth}")


class _StatusError(Exception):
    pass


async def _post_stream(ep: _Endpoint, body: bytes):
    """POST ``body``; yield the response body's pieces as they arrive (chunked or not)."""
    reader, writer = await asyncio.open_connection(
        ep.host, ep.port, ssl=ssl.create_default_context() if ep.tls else None)
    try:
        writer.write(f"{ep.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding":
                chunked = "chunked" in value.lower()
        if status != 200:
            raise _StatusError(f"HTTP {status}: {(await reader.read()).decode(errors='replace')}")
        if not chunked:
            while data := await reader.read(65536):
                yield data
            return
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
    finally:
        writer.close()


async def _stream_one(ep: _Endpoint, model: str, req: workload.Request) -> Sample:
    body = json.dumps({"model": model, "prompt": req.prompt, "max_tokens": req.output_len,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            pending = b""
            async for data in _post_stream(ep, body):
                now = time.perf_counter()
                *events, pending = (pending + data).split(b"\n\n")
                for ev in events:
                    # JSON-decode only what needs it: the client shares the CPU it measures.
                    if ev.startswith(b'data: {"error"'):
                        return Sample(0, 0, 0.0, [], 0.0, ev[6:].decode())
                    if b'"choices":[{' in ev:
                        times.append(now)
                    if b'"usage":{' in ev:
                        usage = json.loads(ev[6:])["usage"]
    except (OSError, EOFError, ValueError, TimeoutError, _StatusError) as e:
        return Sample(0, 0, 0.0, [], 0.0, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if not times or usage is None:
        return Sample(0, 0, 0.0, [], 0.0, "stream ended without tokens or usage")
    return Sample(usage["prompt_tokens"], usage["completion_tokens"], times[0] - t0,
                  list(np.diff(times)), end - t0)


async def _run_http(url: str, model: str, reqs: list[workload.Request], concurrency: int,
                    api_key: str | None) -> tuple[list[Sample], float]:
    ep = _Endpoint(url, api_key)
    limit = asyncio.Semaphore(concurrency)
    warm = await _stream_one(ep, model, workload.Request(0.0, "warm up", 7, 2))
    if warm.error is not None:
        raise RuntimeError(f"{url}: the warm-up request failed: {warm.error}")
    t0 = time.perf_counter()

    async def one(req):
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
        async with limit:
            return await _stream_one(ep, model, req)

    samples = await asyncio.gather(*(one(r) for r in reqs))
    return list(samples), time.perf_counter() - t0


def bench_http(url: str, model: str, reqs: list[workload.Request], concurrency: int,
               api_key: str | None = None, server_pid: int | None = None) -> dict:
    """The workload against ``url``; CPU time is counted when the server's pid is known
    (the server's and this client's: on a small machine both take from the same cores)."""
    cpu0 = _cpu_s(server_pid) if server_pid else math.nan
    samples, duration = asyncio.run(_run_http(url, model, reqs, concurrency, api_key))
    cpu = _cpu_s(server_pid) - cpu0 if server_pid else math.nan
    return summarize(samples, duration, cpu)


def _cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of this process, plus those of process ``pid`` and its
    children (the engine process of jvt serve; Linux /proc)."""
    t = os.times()
    own = t.user + t.system
    if pid is None:
        return own
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
    ticks = sum(int(f[11]) + int(f[12]) for p, f in stats.items()
                if p == pid or int(f[1]) == pid)
    return own + ticks / os.sysconf("SC_CLK_TCK")


class JvtServer:
    """``python -m jvt serve`` in a subprocess on a free port (a context manager)."""

    def __init__(self, model: str, engine_opts: dict, startup_s: float = 900.0,
                 extra: tuple[str, ...] = ()):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "jvt", "serve", "--model", model, "--port", str(self.port),
               "--log-level", "warning", *extra, *_flags(engine_opts)]
        log(f"serve: starting {' '.join(cmd[1:])}")
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jvt serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"jvt serve not healthy after {startup_s} s")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _flags(opts: dict) -> list[str]:
    flags = []
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            flags += [flag, ",".join(map(str, value))]
        else:
            flags += [flag, str(value)]
    return flags


# -- in process ----------------------------------------------------------------------------

def bench_in_process(engine, reqs: list[workload.Request], concurrency: int) -> dict:
    """The same workload on ``engine`` through add_request/step: requests are added at their
    arrival time while fewer than ``concurrency`` are unfinished."""
    from jvt import SamplingParams

    def params(req):
        return SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=True)

    engine.generate(["warm up"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    pending = collections.deque(sorted(reqs, key=lambda r: r.arrival_s))
    active, outputs = [], []
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    while pending or active:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now and len(active) < concurrency:
            req = pending.popleft()
            active.append(engine.add_request(req.prompt, params(req)))
        if engine.has_unfinished():
            engine.step()
        elif pending:
            time.sleep(max(0.0, min(pending[0].arrival_s - now, 0.01)))
        still = []
        for handle in active:
            (outputs if handle.finished else still).append(handle)
        active = still
    duration = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    while engine.has_unfinished():
        engine.step()
    samples = []
    for handle in outputs:
        out = handle.output()
        m = out.metrics
        samples.append(Sample(len(out.prompt_token_ids), len(out.token_ids), m.ttft, m.itl,
                              m.finished_time - m.arrival_time))
    return summarize(samples, duration, cpu)


# -- comparison and report -----------------------------------------------------------------

COLUMNS = ["run", "requests", "duration s", "req/s", "output tok/s", "TTFT mean ms",
           "TTFT median ms", "TTFT p99 ms", "TPOT mean ms", "TPOT median ms", "TPOT p99 ms",
           "ITL mean ms", "ITL median ms", "ITL p99 ms", "E2E mean ms", "E2E median ms",
           "E2E p99 ms", "CPU ms/token"]


def table_row(name: str, s: dict) -> list:
    row = [name, s["completed"], s["duration_s"], s["request_throughput"], s["output_throughput"]]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        row += [s[f"mean_{metric}_ms"], s[f"median_{metric}_ms"], s[f"p99_{metric}_ms"]]
    return [*row, s["cpu_ms_per_output_token"]]


def compare(model: str, engine_opts: dict, plan: Plan, repeat: int = 1) -> dict[str, dict]:
    """``jvt serve`` over HTTP (its default layout, the engine in a process of its own, and
    with ``--engine-in-process``, the engine on a thread of the HTTP process) and the
    in-process engine on one workload, alternating ``repeat`` times (all stay up; the idle ones
    cost nothing), so that load from elsewhere on the machine hits each alike. Each mode's run
    of median output throughput is reported, with every run's throughput under "runs"."""
    import jvt

    reqs = make_workload(plan)
    runs: dict[str, list[dict]] = {HTTP: [], HTTP_THREAD: [], LOCAL: []}
    with JvtServer(model, engine_opts) as server, \
            JvtServer(model, engine_opts, extra=("--engine-in-process",)) as threaded:
        engine = jvt.Engine(model, **engine_opts)
        try:
            for i in range(repeat):
                for name, srv in ((HTTP, server), (HTTP_THREAD, threaded)):
                    log(f"serve: run {i + 1}/{repeat}: {name}, {plan.num_prompts} requests, "
                        f"concurrency {plan.max_concurrency}")
                    runs[name].append(bench_http(srv.url, model, reqs, plan.max_concurrency,
                                                 server_pid=srv.proc.pid))
                log(f"serve: run {i + 1}/{repeat}: {LOCAL}")
                runs[LOCAL].append(bench_in_process(engine, reqs, plan.max_concurrency))
        finally:
            engine.close()
    results = {}
    for name, summaries in runs.items():
        ordered = sorted(summaries, key=lambda s: s["output_throughput"])
        results[name] = {**ordered[(len(ordered) - 1) // 2],
                         "runs": [s["output_throughput"] for s in summaries]}
    return results


HTTP, HTTP_THREAD, LOCAL = ("jvt serve (HTTP)", "jvt serve --engine-in-process (HTTP)",
                             "in-process engine")


def _ratio_notes(results: dict[str, dict]) -> list[str]:
    local = results[LOCAL]
    notes = []
    for name in (HTTP, HTTP_THREAD):
        http = results[name]
        ratio = http["output_throughput"] / local["output_throughput"]
        itl = http["p99_itl_ms"] / local["p99_itl_ms"]
        cpu = local["cpu_ms_per_output_token"] / http["cpu_ms_per_output_token"]
        notes.append(f"{name} / in-process: output throughput {ratio:.3f}, ITL p99 {itl:.2f}x, "
                     f"CPU time per token (inverse; HTTP counts server, engine process and "
                     f"client) {cpu:.3f}")
    if len(local["runs"]) > 1:
        notes.append("output tok/s of every run (alternating): " + ", ".join(
            f"{name} {[round(x) for x in results[name]['runs']]}" for name in results))
    return notes


def _device() -> str:
    import jax

    return "cuda" if jax.default_backend() == "gpu" else "cpu"


# (model, engine options, workload) per run of the bench/run.py part.
SMOKE = [("tiny", {"max_num_seqs": 4, "max_num_batched_tokens": 64, "max_model_len": 256},
          Plan("random", 8, math.inf, 4, 32, 8))]
CPU = [("smollm2-135m", {"max_num_seqs": 16, "max_model_len": 1024},
        Plan("random", 32, math.inf, 16, 128, 32)),
       # The overhead-bound extreme: steps of a ~1M-parameter model take a few milliseconds.
       ("tiny", {"max_num_seqs": 32, "max_num_batched_tokens": 256, "max_model_len": 1024},
        Plan("random", 96, math.inf, 32, 64, 128))]
GPU = [("llama-3.2-1b", {"max_num_seqs": 64, "max_model_len": 2048, "device": "cuda",
                         "dtype": "bfloat16"},
        Plan("sharegpt", 256, math.inf, 64, 1024, 512))]


def run(report: Report, smoke: bool) -> None:
    """bench/run.py part: HTTP vs in-process at concurrency 16 on the CPU, 64 on a GPU (4 in
    the smoke run)."""
    for model, opts, plan in SMOKE if smoke else (GPU if _device() == "cuda" else CPU):
        if report.out_of_time("serve", model):
            continue
        results = compare(model, opts, plan, repeat=1 if smoke else 2)
        t = report.table(f"Serving: jvt serve over HTTP vs the in-process engine ({model}, "
                         f"{plan.dataset}, {plan.num_prompts} requests, concurrency "
                         f"{plan.max_concurrency})", COLUMNS)
        for name, summary in results.items():
            t.add(*table_row(name, summary))
        http, local = results[HTTP], results[LOCAL]
        t.notes += _ratio_notes(results)
        report.headline_row("serve", f"{model} output tok/s at concurrency "
                            f"{plan.max_concurrency}", http["output_throughput"],
                            "in-process engine", local["output_throughput"],
                            higher_is_better=True)


def main(argv: list[str] | None = None) -> int:
    from jvt.server.cli import add_engine_arguments, engine_options

    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None,
                    help="an OpenAI-compatible server to benchmark (default: start jvt serve "
                         "and compare it with the in-process engine)")
    ap.add_argument("--model", default="tiny",
                    help="model name sent in requests; without --url, what jvt serve loads")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests/s, Poisson arrivals (default inf: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128,
                    help="random: prompt length; sharegpt: the longest prompt")
    ap.add_argument("--output-len", type=int, default=128,
                    help="random: output length; sharegpt: the longest output")
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="without --url: alternate HTTP and in-process runs this many times")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_engine_arguments(ap)
    args = ap.parse_args(argv)
    plan = Plan(args.dataset, args.num_prompts, args.request_rate, args.max_concurrency,
                args.input_len, args.output_len, args.workload_seed)
    if args.url:
        results = {args.url: bench_http(args.url, args.model, make_workload(plan),
                                        plan.max_concurrency, args.api_key)}
    else:
        results = compare(args.model, engine_options(args), plan, args.repeat)
    table = Table(f"{args.model}, {plan.dataset}, {plan.num_prompts} requests, rate "
                  f"{plan.request_rate}/s, concurrency {plan.max_concurrency}", COLUMNS)
    for name, summary in results.items():
        table.add(*table_row(name, summary))
    if LOCAL in results:
        table.notes += _ratio_notes(results)
    print(table.markdown(), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "plan": dataclasses.asdict(plan), "model": args.model,
                                        "results": results}, indent=1, default=str))
    return 0 if all(s["failed"] == 0 for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

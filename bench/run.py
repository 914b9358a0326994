"""Run the selected benchmark parts in one process and write report.md, results.json and plots.

Parts (in run order): kernels, vmm, multiturn, e2e, memory (memory reuses e2e's trace), cpu
(the real default model on the CPU: bench/cpu.py), serve (HTTP vs in-process: bench/serve.py),
tp (tensor parallelism on two GPUs: bench/tp.py).
A part (or an e2e model) that would start after --budget-s seconds is skipped with a note, so
that a run in a time-limited call still writes its report. `--smoke` runs every code path on
tiny sizes (CPU-friendly); GPU-only baselines are skipped with a printed reason. The headline
table is printed last.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time
import traceback

from bench.common import Report, log

PARTS = {  # name -> module with run(report, smoke), in run order
    "kernels": "bench.kernels",
    "vmm": "bench.vmm_overhead",
    "multiturn": "bench.multiturn",
    "e2e": "bench.e2e",
    "memory": "bench.memory",
    "cpu": "bench.cpu",
    "serve": "bench.serve",
    "tp": "bench.tp",
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--out", required=True, help="directory for report.md, results.json, plots")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check every code path")
    ap.add_argument("--only", default="", help=f"comma-separated parts among {list(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what would start after this many seconds (default: 540 for "
                         "the full run, none with --smoke)")
    args = ap.parse_args(argv)
    only = [p for p in args.only.split(",") if p]
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; allowed: {list(PARTS)}")
    args.parts = [p for p in PARTS if p in only] if only else list(PARTS)
    if args.budget_s is None:
        args.budget_s = math.inf if args.smoke else 540.0
    if not args.budget_s > 0:
        ap.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def environment(smoke: bool) -> dict:
    import jax

    dev = jax.devices()[0]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "smoke" if smoke else "full",
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '?')}",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }
    for name in ("torch", "transformers"):
        try:
            meta[name] = importlib.import_module(name).__version__
        except ImportError:
            meta[name] = "not installed"
    return meta


def main(argv=None) -> None:
    args = parse_args(argv)
    report = Report(args.out, environment(args.smoke), budget_s=args.budget_s)
    log(f"bench: parts {args.parts}, {report.meta}")
    failed = []
    for part in args.parts:
        # memory over e2e's recorded trace is arithmetic (seconds): never worth skipping.
        cheap = part == "memory" and "kv_trace" in report.shared
        if not cheap and report.out_of_time(part, "whole part"):
            continue
        log(f"== {part}")
        try:
            importlib.import_module(PARTS[part]).run(report, args.smoke)
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
            traceback.print_exc()
            report.skip(part, "whole part", f"failed: {type(e).__name__}: {e}")
            failed.append(part)
        report.write()  # after every part, so a run cut short keeps what it measured
    headline = report.write()
    log(f"wrote {args.out}/report.md, results.json and {len(report.plots)} plot(s)")
    print("\n" + headline, flush=True)
    if failed:
        print(f"parts that failed: {failed}", file=sys.stderr)
        sys.exit(1)

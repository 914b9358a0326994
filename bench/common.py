"""Shared benchmark plumbing: progress lines, timing, bandwidth, reference checks, report output.

Timing follows one rule everywhere: every implementation is called once and checked against a
reference, then timed as the median over `reps` samples, each sample the mean of `inner`
back-to-back calls closed by one device synchronisation (so host dispatch overlaps device work,
as it does in a real step loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_T0 = time.monotonic()


def elapsed() -> float:
    """Seconds since the run started (this module's import)."""
    return time.monotonic() - _T0


def log(msg: str) -> None:
    """Print one progress line: wall clock time and seconds since the run started."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


class CheckError(RuntimeError):
    """An implementation's output differs from the reference: it is not timed."""


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float  # median seconds per call
    p10_s: float
    p90_s: float
    calls: int  # total timed calls


def jax_sync(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


def time_fn(
    fn: Callable[[], Any],
    *,
    sync: Callable[[Any], None] = jax_sync,
    reps: int = 15,
    target_sample_s: float = 0.01,
    max_inner: int = 200,
) -> Timing:
    """Time `fn()` (already compiled and checked). Warm up, pick `inner` so one sample lasts
    about `target_sample_s`, then take `reps` samples."""
    sync(fn())
    t0 = time.perf_counter()
    sync(fn())
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(max_inner, math.ceil(target_sample_s / one)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn()
        sync(out)
        samples.append((time.perf_counter() - t0) / inner)
    samples.sort()
    return Timing(
        median_s=statistics.median(samples),
        p10_s=samples[int(0.1 * (len(samples) - 1))],
        p90_s=samples[int(0.9 * (len(samples) - 1))],
        calls=reps * inner,
    )


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s: (read + write) bytes of `y = x + 1` over a bf16 buffer
    of `nbytes`, the practical ceiling of a memory-bound kernel."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 2
    x = jnp.zeros((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    t = time_fn(lambda: f(x), reps=11)
    return 2 * n * 2 / t.median_s


def check_close(name: str, out: Any, ref: Any, *, rel: float = 0.02, abs_: float = 2e-3) -> float:
    """Max |out - ref| (in fp32); raise CheckError when it exceeds rel * max|ref| + abs_.

    The bound is loose enough for bf16 kernels (bf16 probabilities, fp32 accumulation) and
    tight enough that a wrong mask, head mapping or position is caught (those give errors of
    the order of the outputs themselves)."""
    out = np.asarray(out, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if out.shape != ref.shape:
        raise CheckError(f"{name}: output shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        raise CheckError(f"{name}: output has non-finite values")
    err = float(np.max(np.abs(out - ref))) if out.size else 0.0
    bound = rel * float(np.max(np.abs(ref), initial=0.0)) + abs_
    if err > bound:
        raise CheckError(f"{name}: max |out - ref| = {err:.3g} > allowed {bound:.3g}")
    return err


def decode_rate(outs) -> float:
    """Tokens/s of RequestOutputs generated together, after each request's first token:
    tokens sampled after the last first token over the time from it to the last token."""
    first = max(o.metrics.token_times[0] for o in outs)
    last = max(o.metrics.token_times[-1] for o in outs)
    after = sum(sum(t > first for t in o.metrics.token_times) for o in outs)
    return after / (last - first)


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of values; nan when empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, *row: Any) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"{self.title}: row has {len(row)} values, table has "
                             f"{len(self.columns)} columns {self.columns}")
        self.rows.append(list(row))

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


@dataclasses.dataclass
class Plot:
    name: str  # file stem
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]  # label -> (xs, ys)
    logx: bool = False
    logy: bool = False
    categories: list[str] | None = None  # grouped bars: xs index these labels


class Report:
    """Everything a run produces: tables (markdown + JSON), skips with reasons, plots and the
    headline table printed last."""

    def __init__(self, out_dir: Path, meta: dict[str, Any], budget_s: float = math.inf):
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.budget_s = budget_s  # wall-clock budget of the whole run
        self.tables: list[Table] = []
        self.plots: list[Plot] = []
        self.skips: list[dict[str, str]] = []
        self.shared: dict[str, Any] = {}  # data one part hands to a later one (KV trace)
        self.headline = Table("Headline", ["benchmark", "metric", "jvt", "baseline", "value",
                                           "jvt / baseline"])

    def table(self, title: str, columns: list[str]) -> Table:
        t = Table(title, columns)
        self.tables.append(t)
        return t

    def out_of_time(self, section: str, what: str) -> bool:
        """True (and the skip recorded) when the run's time budget is spent."""
        if elapsed() < self.budget_s:
            return False
        self.skip(section, what, f"time budget of {self.budget_s:.0f} s spent")
        return True

    def skip(self, section: str, what: str, reason: str) -> None:
        log(f"SKIP {section}/{what}: {reason}")
        self.skips.append({"section": section, "what": what, "reason": reason})

    def headline_row(self, bench: str, metric: str, jvt: float, baseline: str, value: float,
                     higher_is_better: bool | None) -> None:
        """One line of the final table; the ratio is > 1 when jvt is better (no ratio when
        higher_is_better is None: the baseline is a control, not a competitor)."""
        ratio = math.nan
        if higher_is_better is not None and jvt > 0 and value > 0:
            ratio = jvt / value if higher_is_better else value / jvt
        self.headline.add(bench, metric, jvt, baseline, value, ratio)

    def write(self) -> str:
        """Write report.md, results.json and the plots; return the headline markdown."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        parts = ["# jvt benchmark results", ""]
        parts += [f"- {k}: {v}" for k, v in self.meta.items()] + [""]
        parts.append(self.headline.markdown())
        parts += [t.markdown() for t in self.tables]
        if self.skips:
            parts.append("### Skipped\n")
            parts += [f"- {s['section']}/{s['what']}: {s['reason']}" for s in self.skips]
        (self.out_dir / "report.md").write_text("\n".join(parts) + "\n")
        payload = {
            "meta": self.meta,
            "headline": self.headline.records(),
            "tables": {t.title: {"rows": t.records(), "notes": t.notes} for t in self.tables},
            "skips": self.skips,
        }
        (self.out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
        for p in self.plots:
            write_plot(self.out_dir, p)
        return self.headline.markdown()


def write_plot(out_dir: Path, plot: Plot) -> Path:
    """PNG through matplotlib; where matplotlib is not installed, an SVG drawn by hand."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib not importable: writing {plot.name}.svg instead of a PNG")
        return _write_svg(out_dir, plot)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if plot.categories is not None:
        width = 0.8 / max(1, len(plot.series))
        for i, (label, (xs, ys)) in enumerate(plot.series.items()):
            ax.bar([x + (i - (len(plot.series) - 1) / 2) * width for x in xs], ys, width,
                   label=label)
        ax.set_xticks(range(len(plot.categories)), plot.categories)
    else:
        for label, (xs, ys) in plot.series.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    if plot.logx:
        ax.set_xscale("log", base=2)
    if plot.logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{plot.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_svg(out_dir: Path, plot: Plot) -> Path:
    w, h, m = 700, 450, 60
    pts = [(x, y) for xs, ys in plot.series.values() for x, y in zip(xs, ys)
           if math.isfinite(y)]
    tx = (lambda v: math.log2(v)) if plot.logx else (lambda v: v)
    ty = (lambda v: math.log10(max(v, 1e-30))) if plot.logy else (lambda v: v)
    xs_all = [tx(x) for x, _ in pts] or [0.0, 1.0]
    ys_all = [ty(y) for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs_all), max(xs_all) + 1e-9
    y0 = min(ys_all) if plot.logy else min(min(ys_all), 0.0)
    y1 = max(ys_all) + 1e-9

    def px(x: float, y: float) -> str:
        return (f"{m + (tx(x) - x0) / (x1 - x0) * (w - 2 * m):.1f},"
                f"{h - m - (ty(y) - y0) / (y1 - y0) * (h - 2 * m):.1f}")

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    body = [(f'<rect x="{m}" y="{m}" width="{w - 2 * m}" height="{h - 2 * m}" fill="none" '
             'stroke="#888"/>'),
            f'<text x="{w / 2}" y="25" text-anchor="middle">{plot.title}</text>',
            f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{plot.xlabel}</text>',
            (f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" '
             f'text-anchor="middle">{plot.ylabel}</text>')]
    for i, (label, (xs, ys)) in enumerate(plot.series.items()):
        c = colors[i % len(colors)]
        line = " ".join(px(x, y) for x, y in zip(xs, ys) if math.isfinite(y))
        body.append(f'<polyline points="{line}" fill="none" stroke="{c}"/>')
        body.append(f'<text x="{w - m + 5}" y="{m + 15 * i}" fill="{c}" '
                    f'font-size="10">{label}</text>')
    path = out_dir / f"{plot.name}.svg"
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 120}" height="{h}">'
                    + "".join(body) + "</svg>\n")
    return path

"""Attention kernels: jvt's op (KV in the virtual store) against its peers.

Decode: one query token per sequence over a B x L cache (bf16, Hq 32 / Hkv 8 / D 128), jvt vs
cuDNN and XLA through jax.nn.dot_product_attention on a contiguous [B, L, Hkv, D] cache, Pallas
paged_attention (page 16) and decode_attention, torch SDPA (flash, cuDNN) when torch has CUDA,
and the floor: KV bytes / measured copy bandwidth. Prefill: one causal sequence of T tokens,
jvt vs cuDNN (TFLOP/s). Every output is checked against an fp32 reference before it is timed.

jvt is timed alone: the store is filled once (prefill of the whole context through the op), then
a jitted decode step re-writes the last position and attends over all L tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import CheckError, Plot, Report, check_close, jax_sync, log, time_fn

# Anchors measured on the target H100 (design.md), batch 32 x 4096, ms.
ANCHORS_32x4096_MS = {
    "cudnn (torch)": 0.185, "cudnn (jax)": 0.199, "flash2 (torch)": 0.20,
    "pallas paged": 0.295, "pallas decode": 0.57, "xla": 0.58,
}
_ANCHOR_OF = {"torch sdpa cudnn": "cudnn (torch)", "jax cudnn": "cudnn (jax)",
              "torch sdpa flash": "flash2 (torch)", "pallas paged (16)": "pallas paged",
              "pallas decode": "pallas decode", "jax xla": "xla"}


@dataclasses.dataclass(frozen=True)
class Shape:
    q_heads: int
    kv_heads: int
    head_dim: int
    decode: tuple[tuple[int, int], ...]  # (batch, context) pairs
    prefill: tuple[int, ...]  # causal sequence lengths


FULL = Shape(32, 8, 128, decode=((1, 32768), (8, 16384), (32, 4096), (128, 1024)),
             prefill=(1024, 4096, 16384))
SMOKE = Shape(8, 2, 64, decode=((1, 97), (3, 40)), prefill=(17, 97))
# Prefill with the other head dim the CUDA kernels take (SmolLM2 and other small models).
FULL_OTHER_D = Shape(32, 8, 64, decode=(), prefill=(4096, 16384))
SMOKE_OTHER_D = Shape(8, 2, 128, decode=(), prefill=(17,))


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _store(shape: Shape, slots: int, max_tokens: int):
    from jvt.kv import KVStore

    token_bytes = 2 * shape.kv_heads * shape.head_dim * 2
    # Budget: the slots' tokens rounded up to 2 MiB chunks, plus one chunk of slack per slot.
    budget = slots * (math.ceil(max_tokens * token_bytes / (2 << 20)) + 1) * (2 << 20)
    return KVStore(1, shape.kv_heads, shape.head_dim, "bfloat16", slots, max_tokens, budget,
                   device="cuda:0" if on_gpu() else "cpu")


def _meta(seq_start, seq_slot, seq_len, positions):
    from jvt.types import AttnMeta

    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    return AttnMeta(positions=i32(positions), seq_start=i32(seq_start), seq_slot=i32(seq_slot),
                    seq_len=i32(seq_len))


def decode_reference(q, k, v, scale: float) -> np.ndarray:
    """fp32 softmax(scale q.K) V for q [B, Hq, D], k/v [B, L, Hkv, D] -> [B, Hq, D]."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bkgd,blkd->bkgl", qg, k.astype(jnp.float32), precision="highest") * scale
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgl,blkd->bkgd", p, v.astype(jnp.float32), precision="highest")
    return np.asarray(o.reshape(b, hq, d))


def causal_reference_rows(q, k, v, rows: np.ndarray, scale: float) -> np.ndarray:
    """fp32 causal attention of the query rows `rows` of q [T, Hq, D] over k/v [T, Hkv, D]."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q[rows].astype(jnp.float32).reshape(len(rows), hkv, hq // hkv, d)
    s = jnp.einsum("rkgd,skd->rkgs", qg, k.astype(jnp.float32), precision="highest") * scale
    mask = jnp.arange(t)[None, :] <= jnp.asarray(rows)[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    o = jnp.einsum("rkgs,skd->rkgd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32),
                   precision="highest")
    return np.asarray(o.reshape(len(rows), hq, d))


# -- decode implementations: each returns a zero-argument callable producing [B, Hq, D] -------

def _jvt_decode(shape, q, k, v, scale, stack):
    b, length = k.shape[:2]
    store = stack(_store(shape, b, length))
    sid = store.store_id
    for s in range(b):
        store.reserve(s, length)
    store.apply_pending()
    from jvt import ops

    fill = jax.jit(lambda qq, kk, vv, m: ops.attention(qq, kk, vv, m, store_id=sid, layer=0,
                                                       scale=scale))
    for s in range(b):  # fill slot s: one causal prefill over its whole context
        meta = _meta([0, length], [s], [length], np.arange(length))
        jax.block_until_ready(fill(jnp.zeros((length, shape.q_heads, shape.head_dim),
                                             q.dtype), k[s], v[s], meta))
    meta = _meta(np.arange(b + 1), np.arange(b), np.full(b, length), np.full(b, length - 1))
    k_last, v_last = k[:, -1], v[:, -1]
    step = jax.jit(lambda qq, kk, vv, m: ops.attention(qq, kk, vv, m, store_id=sid, layer=0,
                                                       scale=scale))

    def run():
        return step(q, k_last, v_last, meta)

    def checked():
        out = run()
        store.check()
        return out

    return run, checked


def _dpa_decode(impl: str):
    def make(shape, q, k, v, scale, stack):
        f = jax.jit(lambda qq, kk, vv: jax.nn.dot_product_attention(
            qq[:, None], kk, vv, scale=scale, implementation=impl)[:, 0])
        run = lambda: f(q, k, v)
        return run, run
    return make


def _pad_to(x, axis: int, multiple: int):
    pad = -x.shape[axis] % multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths) if pad else x


def _splits(n_units: int) -> int:
    """The most KV splits (<= 16) that the Pallas kernels accept for n_units blocks."""
    return max(s for s in (1, 2, 4, 8, 16) if s <= max(1, n_units))


def _pallas_decode(shape, q, k, v, scale, stack):
    from jax.experimental.pallas.ops.gpu import decode_attention

    b, length = k.shape[:2]
    splits = _splits(length // 128) if on_gpu() else 2
    kp, vp = _pad_to(k, 1, 16 * splits), _pad_to(v, 1, 16 * splits)
    lens = jnp.full((b,), length, jnp.int32)
    f = jax.jit(lambda qq, kk, vv, n: decode_attention.gqa(
        qq, kk, vv, kv_seq_len=n, sm_scale=scale, k_splits=splits, interpret=not on_gpu()))
    run = lambda: f(q, kp, vp, lens)
    return run, run


def _pallas_paged(shape, q, k, v, scale, stack):
    from jax.experimental.pallas.ops.gpu import paged_attention

    b, length, hkv, d = k.shape
    page = 16
    splits = _splits(math.ceil(length / page) // 8) if on_gpu() else 2
    kp, vp = _pad_to(k, 1, page * splits), _pad_to(v, 1, page * splits)
    pages = kp.shape[1] // page
    # [B, P*16, Hkv, D] -> [Hkv, B*P, 16, D]: every sequence's pages back to back.
    to_pages = lambda x: x.reshape(b, pages, page, hkv, d).transpose(3, 0, 1, 2, 4).reshape(
        hkv, b * pages, page, d)
    k_pages, v_pages = to_pages(kp), to_pages(vp)
    tables = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
    lens = jnp.full((b,), length, jnp.int32)
    # paged_attention has no scale argument: it computes q . k, so q is pre-scaled.
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    f = jax.jit(lambda qq, kk, vv, t, n: paged_attention.paged_attention(
        qq, kk, vv, t, n, k_splits=splits, interpret=not on_gpu()))
    run = lambda: f(qs, k_pages, v_pages, tables, lens)
    return run, run


def _torch_decode(backend_name: str):
    def make(shape, q, k, v, scale, stack):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        tq = _to_torch(q)[:, :, None]  # [B, Hq, 1, D]
        tk = _to_torch(k).transpose(1, 2).contiguous()  # [B, Hkv, L, D]
        tv = _to_torch(v).transpose(1, 2).contiguous()

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, scale=scale, enable_gqa=True)[:, :, 0]

        return run, run
    return make


def _to_torch(x):
    import torch

    return torch.from_dlpack(x) if on_gpu() else torch.from_numpy(
        np.asarray(x.astype(jnp.float32))).to(torch.bfloat16)


def torch_cuda_reason() -> str:
    """'' when torch with CUDA is usable, else why not."""
    try:
        import torch
    except ImportError as e:
        return f"torch not importable ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA device"
    return ""


def _torch_sync(_out) -> None:
    import torch

    torch.cuda.synchronize()


def decode_impls() -> dict[str, tuple[Callable, str]]:
    """name -> (factory, reason it cannot run here or '')."""
    gpu = on_gpu()
    no_gpu = "" if gpu else "needs a GPU"
    torch_reason = torch_cuda_reason() if gpu else "needs a GPU (torch CUDA)"
    pallas = ""
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention, paged_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pallas = f"Pallas GPU ops not importable: {type(e).__name__}: {e}"
    return {
        "jvt": (_jvt_decode, ""),
        "jax cudnn": (_dpa_decode("cudnn"), no_gpu),
        "jax xla": (_dpa_decode("xla"), ""),
        "pallas paged (16)": (_pallas_paged, pallas),
        "pallas decode": (_pallas_decode, pallas),
        "torch sdpa flash": (_torch_decode("FLASH_ATTENTION"), torch_reason),
        "torch sdpa cudnn": (_torch_decode("CUDNN_ATTENTION"), torch_reason),
    }


class _Stack:
    """Keeps stores alive for one configuration and closes them after."""

    def __init__(self):
        self.items = []

    def __call__(self, item):
        self.items.append(item)
        return item

    def close(self):
        for item in self.items:
            item.close()
        self.items.clear()


def run_decode(report: Report, shape: Shape, bandwidth: float) -> None:
    impls = decode_impls()
    for name, (_, reason) in impls.items():
        if reason:
            report.skip("kernels", name, reason)
    table = report.table(
        f"Decode attention (bf16, Hq {shape.q_heads} / Hkv {shape.kv_heads} / D {shape.head_dim})",
        ["batch", "context", "impl", "ms", "GB/s", "% of floor", "max err", "H100 anchor ms"])
    table.notes.append(f"floor = KV bytes / copy bandwidth ({bandwidth / 1e9:.0f} GB/s measured)")
    table.notes.append("H100 anchors at 32 x 4096 (design.md, ms): " + ", ".join(
        f"{k} {v}" for k, v in ANCHORS_32x4096_MS.items()) + ", floor 0.179")
    scale = shape.head_dim ** -0.5
    series: dict[str, tuple[list, list]] = {}
    for b, length in shape.decode:
        key = jax.random.split(jax.random.key(b * 100003 + length), 3)
        q = jax.random.normal(key[0], (b, shape.q_heads, shape.head_dim), jnp.bfloat16)
        k = jax.random.normal(key[1], (b, length, shape.kv_heads, shape.head_dim), jnp.bfloat16)
        v = jax.random.normal(key[2], (b, length, shape.kv_heads, shape.head_dim), jnp.bfloat16)
        ref = decode_reference(q, k, v, scale)
        kv_bytes = 2 * k.size * 2
        floor_s = kv_bytes / bandwidth
        table.add(b, length, "floor", floor_s * 1e3, bandwidth / 1e9, 100.0, math.nan, 0.179
                  if (b, length) == (32, 4096) else math.nan)
        for name, (factory, reason) in impls.items():
            if reason:
                continue
            stack = _Stack()
            try:
                log(f"decode {b}x{length} {name}")
                run, checked = factory(shape, q, k, v, scale, stack)
                err = check_close(f"decode {b}x{length} {name}", _np(checked()), ref)
                t = time_fn(run, sync=_torch_sync if name.startswith("torch") else jax_sync)
            except CheckError as e:
                report.skip("kernels", f"decode {b}x{length} {name}", f"WRONG OUTPUT: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a baseline failing must not end the run
                report.skip("kernels", f"decode {b}x{length} {name}",
                            f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            finally:
                stack.close()
            anchor = ANCHORS_32x4096_MS.get(_ANCHOR_OF.get(name, ""), math.nan)
            table.add(b, length, name, t.median_s * 1e3, kv_bytes / t.median_s / 1e9,
                      100 * floor_s / t.median_s, err,
                      anchor if (b, length) == (32, 4096) else math.nan)
            xs, ys = series.setdefault(name, ([], []))
            xs.append(f"{b}x{length}")
            ys.append(100 * floor_s / t.median_s)
        del q, k, v
    _decode_headline(report, table, shape)
    report.plots.append(_bar_plot(series))


def _bar_plot(series):
    labels = sorted({x for xs, _ in series.values() for x in xs},
                    key=lambda bl: tuple(int(n) for n in bl.split("x")))
    numeric = {name: ([labels.index(x) for x in xs], ys) for name, (xs, ys) in series.items()}
    return Plot("decode_attention", "Decode attention: % of the memory floor (higher is better)",
                "batch x context", "% of floor", numeric, categories=labels)


def _decode_headline(report: Report, table, shape: Shape) -> None:
    big = (32, 4096) if (32, 4096) in shape.decode else max(shape.decode,
                                                           key=lambda bl: bl[0] * bl[1])
    rows = {r[2]: r for r in table.rows if (r[0], r[1]) == big}
    if "jvt" not in rows:
        return
    best = min((r for n, r in rows.items() if n not in ("jvt", "floor")), key=lambda r: r[3],
               default=None)
    if best is not None:
        report.headline_row("decode attention", f"ms at {big[0]}x{big[1]}", rows["jvt"][3],
                            f"best peer: {best[2]}", best[3], higher_is_better=False)
    report.headline_row("decode attention", f"% of floor at {big[0]}x{big[1]}",
                        rows["jvt"][5], "floor", 100.0, higher_is_better=True)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x.astype(jnp.float32))


def run_prefill(report: Report, shape: Shape) -> None:
    table = report.table(f"Prefill attention (one causal sequence, bf16, Hq {shape.q_heads} / "
                         f"Hkv {shape.kv_heads} / D {shape.head_dim})",
                         ["tokens", "impl", "ms", "TFLOP/s", "max err (sampled rows)"])
    table.notes.append("FLOPs = 2 * 2 * Hq * D * T^2 / 2 (causal half); checked on 48 rows "
                       "(first, last and random) against an fp32 reference")
    scale = shape.head_dim ** -0.5
    impls = _prefill_impls()
    if not on_gpu():
        report.skip("kernels", "prefill jax cudnn", "needs a GPU")
    for t in shape.prefill:
        q, k, v = _random_sequence(shape, t)
        rows = _checked_rows(t, seed=t)
        ref = causal_reference_rows(q, k, v, rows, scale)
        flops = 2 * 2 * shape.q_heads * shape.head_dim * t * t / 2
        for name, impl in impls.items():
            make = functools.partial(_prefill_pair, impl, shape, q, k, v, scale)
            measured = _checked_timing(report, f"prefill {t} {name}", make, rows, ref)
            if measured is not None:
                seconds, err = measured
                table.add(t, name, seconds * 1e3, flops / seconds / 1e12, err)
    rows_by = {(r[0], r[1]): r for r in table.rows}
    t = max(shape.prefill)
    peer = "jax cudnn" if on_gpu() else "jax xla"
    if (t, "jvt") in rows_by and (t, peer) in rows_by:
        report.headline_row("prefill attention", f"TFLOP/s at {t} tokens, D {shape.head_dim}",
                            rows_by[(t, "jvt")][3],
                            peer, rows_by[(t, peer)][3], higher_is_better=True)


def run_chunked_prefill(report: Report, shape: Shape, prefix: int, chunk: int) -> None:
    """`chunk` new tokens of one sequence over `prefix` tokens already in the store (jvt), or
    over a dense K/V array with a bottom-right causal mask given as a bias (the peers)."""
    table = report.table(f"Chunked prefill ({chunk} new tokens over a cached prefix of "
                         f"{prefix}, bf16, Hq {shape.q_heads} / Hkv {shape.kv_heads} / "
                         f"D {shape.head_dim})",
                         ["impl", "ms", "TFLOP/s", "max err (sampled rows)"])
    table.notes.append("FLOPs = 2 * 2 * Hq * D * chunk * (prefix + (chunk + 1) / 2); checked "
                       "on 48 rows of the chunk against an fp32 reference over all tokens; the "
                       "peers read a [chunk, prefix + chunk] bf16 mask bias (the bottom-right "
                       "causal alignment jax's is_causal lacks)")
    scale = shape.head_dim ** -0.5
    t = prefix + chunk
    q, k, v = _random_sequence(shape, t)
    rows = _checked_rows(chunk, seed=t)
    ref = causal_reference_rows(q, k, v, rows + prefix, scale)
    flops = 2 * 2 * shape.q_heads * shape.head_dim * chunk * (prefix + (chunk + 1) / 2)
    for name, impl in _prefill_impls().items():
        make = functools.partial(_chunk_pair, impl, shape, q, k, v, prefix, scale)
        measured = _checked_timing(report, f"chunked prefill {chunk} over {prefix} {name}",
                                   make, rows, ref)
        if measured is not None:
            seconds, err = measured
            table.add(name, seconds * 1e3, flops / seconds / 1e12, err)


def _random_sequence(shape: Shape, t: int):
    """q [t, Hq, D], k and v [t, Hkv, D] of one sequence, bf16 N(0, 1), seeded by t."""
    key = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(key[0], (t, shape.q_heads, shape.head_dim), jnp.bfloat16)
    k = jax.random.normal(key[1], (t, shape.kv_heads, shape.head_dim), jnp.bfloat16)
    v = jax.random.normal(key[2], (t, shape.kv_heads, shape.head_dim), jnp.bfloat16)
    return q, k, v


def _checked_rows(n: int, seed: int) -> np.ndarray:
    """The rows of n checked against the fp32 reference: the first 8, the last 8, 32 random."""
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([np.arange(min(8, n)), np.arange(max(0, n - 8), n),
                                     rng.integers(0, n, 32)]))


def _prefill_impls() -> dict[str, str | None]:
    """Prefill implementations: jvt's op (None) and dot_product_attention's peer here."""
    return {"jvt": None, "jax cudnn": "cudnn"} if on_gpu() else {"jvt": None, "jax xla": "xla"}


def _prefill_pair(impl, shape, q, k, v, scale, stack):
    """(run, checked) of one causal prefill: jvt's op (impl None) or dot_product_attention."""
    if impl is None:
        return _jvt_prefill(shape, q, k, v, scale, stack)
    f = _dpa_prefill(impl, q, k, v, scale)
    return f, f


def _chunk_pair(impl, shape, q, k, v, prefix, scale, stack):
    """(run, checked) of one chunk over a cached prefix: jvt's op or dot_product_attention."""
    if impl is None:
        return _jvt_chunk(shape, q, k, v, prefix, scale, stack)
    f = _dpa_chunk(impl, q, k, v, prefix, scale)
    return f, f


def _checked_timing(report: Report, label: str, make, rows: np.ndarray, ref: np.ndarray):
    """(median seconds, max error) of the (run, checked) pair `make(stack)` builds, its
    output rows checked against `ref` first; None (reported as skipped) when it fails or is
    wrong."""
    stack = _Stack()
    try:
        log(label)
        run, checked = make(stack)
        err = check_close(label, _np(checked())[rows], ref)
        return time_fn(run, reps=7).median_s, err
    except Exception as e:  # noqa: BLE001 - includes CheckError: reported, not timed
        report.skip("kernels", label, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return None
    finally:
        stack.close()


def _jvt_chunk(shape, q, k, v, prefix, scale, stack):
    from jvt import ops

    t = q.shape[0]
    store = stack(_store(shape, 1, t))
    store.reserve(0, t)
    store.apply_pending()
    sid = store.store_id
    f = jax.jit(lambda qq, kk, vv, m: ops.attention(qq, kk, vv, m, store_id=sid, layer=0,
                                                    scale=scale))
    f(q[:prefix], k[:prefix], v[:prefix], _meta([0, prefix], [0], [prefix],
                                                 np.arange(prefix))).block_until_ready()
    meta = _meta([0, t - prefix], [0], [t], np.arange(prefix, t))
    qc, kc, vc = q[prefix:], k[prefix:], v[prefix:]

    def checked():
        out = f(qc, kc, vc, meta)
        store.check()
        return out

    return (lambda: f(qc, kc, vc, meta)), checked


def _dpa_chunk(impl: str, q, k, v, prefix: int, scale: float):
    t = q.shape[0]
    allowed = np.arange(t)[None, :] <= np.arange(prefix, t)[:, None]
    bias = jnp.asarray(np.where(allowed, 0.0, -1e9)[None, None], jnp.bfloat16)
    f = jax.jit(lambda qq, kk, vv, bb: jax.nn.dot_product_attention(
        qq[None], kk[None], vv[None], bias=bb, scale=scale, implementation=impl)[0])
    qc = q[prefix:]
    return lambda: f(qc, k, v, bias)


def _dpa_prefill(impl: str, q, k, v, scale: float):
    f = jax.jit(lambda qq, kk, vv: jax.nn.dot_product_attention(
        qq[None], kk[None], vv[None], scale=scale, is_causal=True, implementation=impl)[0])
    return lambda: f(q, k, v)


def _jvt_prefill(shape, q, k, v, scale, stack):
    from jvt import ops

    t = q.shape[0]
    store = stack(_store(shape, 1, t))
    store.reserve(0, t)
    store.apply_pending()
    sid = store.store_id
    meta = _meta([0, t], [0], [t], np.arange(t))
    f = jax.jit(lambda qq, kk, vv, m: ops.attention(qq, kk, vv, m, store_id=sid, layer=0,
                                                    scale=scale))

    def checked():
        out = f(q, k, v, meta)
        store.check()
        return out

    return (lambda: f(q, k, v, meta)), checked


def run(report: Report, smoke: bool) -> None:
    """Decode grid, prefill at D 128 and at D 64, a prefill chunk over a cached prefix; the
    copy bandwidth is measured first (the floor)."""
    from bench.common import copy_bandwidth

    shape = SMOKE if smoke else FULL
    bandwidth = copy_bandwidth((64 << 20) if smoke else (1 << 30))
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    report.meta["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    run_decode(report, shape, bandwidth)
    run_prefill(report, shape)
    run_prefill(report, SMOKE_OTHER_D if smoke else FULL_OTHER_D)
    run_chunked_prefill(report, shape, *((80, 17) if smoke else (14336, 2048)))
    if not torch_cuda_reason():
        import torch

        torch.cuda.empty_cache()  # give the SDPA inputs' cached blocks back for later parts

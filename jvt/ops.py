"""The jvt_attention op: append this step's K/V to the native KV store and attend over it.

Also a pure-JAX fp32 reference of the same computation on explicit KV arrays, used as the
oracle in tests and as a stand-in for the op while the model is developed.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from jvt.types import AttnMeta

TARGET = "jvt_attention"
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_CUDA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDA_DTYPE_CODES = {jnp.dtype(jnp.float16): 1, jnp.dtype(jnp.bfloat16): 2}  # native DType
_CUDA_HEAD_DIMS = (64, 128)
_CPU_MAX_HEAD_DIM = 256

_register_lock = threading.Lock()
_registered = False


def register_targets() -> None:
    """Register the native FFI targets once: every "cpu" one (jvt_attention, jvt_qmatmul)
    always, the "CUDA" ones when built with CUDA and a GPU exists."""
    global _registered
    with _register_lock:
        if _registered:
            return
        # jax 0.10: registering a CPU target before the CPU backend exists is silently lost.
        jax.devices()
        from jvt import _native

        handlers = _native.registrations()
        for name, capsule in handlers["cpu"].items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        if "CUDA" in handlers and _gpu_backend_present():
            for name, capsule in handlers["CUDA"].items():
                jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


def _gpu_backend_present() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def _store_spec(store_id: int) -> dict:
    from jvt import _native

    spec = _native.attention_store_spec(store_id)
    if spec is None:
        raise ValueError(f"store_id {store_id} is not a registered KV store (create a jvt.KVStore)")
    return spec


def _check_args(q, k, v, meta: AttnMeta, store_id, layer, scale) -> dict:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have rank 3 ([T, heads, head_dim]), got shape {x.shape}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be bfloat16, float16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes must match, got {k.shape} and {v.shape}")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k/v shape {k.shape} must be [T={t}, Hkv, D={d}] to match q {q.shape}")
    hkv = k.shape[1]
    if hkv == 0 or hq == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    for name in ("positions", "seq_start", "seq_slot", "seq_len"):
        x = getattr(meta, name)
        if x.dtype != jnp.int32 or x.ndim != 1:
            raise ValueError(f"meta.{name} must be a 1-D int32 array, got {x.dtype} {x.shape}")
    s = meta.seq_slot.shape[0]
    if meta.seq_len.shape[0] != s:
        raise ValueError(f"meta.seq_len has {meta.seq_len.shape[0]} entries, seq_slot has {s}")
    if meta.seq_start.shape[0] != s + 1:
        raise ValueError(f"meta.seq_start must have S+1 = {s + 1} entries, "
                         f"got {meta.seq_start.shape[0]}")
    if meta.positions.shape[0] != t:
        raise ValueError(f"meta.positions must have T = {t} entries, got {meta.positions.shape[0]}")
    for name, x in (("store_id", store_id), ("layer", layer)):
        if not isinstance(x, (int, np.integer)) or isinstance(x, bool):
            raise TypeError(f"{name} must be a Python int (a static attribute), got {x!r}")
    if not isinstance(scale, (float, int, np.floating)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float (a static attribute), got {scale!r}")
    spec = _store_spec(int(store_id))
    if spec["device"] >= 0:
        if d not in _CUDA_HEAD_DIMS:
            raise ValueError(f"head_dim {d} is not supported on CUDA "
                             f"(supported: {_CUDA_HEAD_DIMS})")
        if q.dtype not in _CUDA_DTYPES:
            raise ValueError(f"q/k/v dtype {q.dtype} is not supported on CUDA "
                             "(supported: bfloat16, float16)")
    elif d % 8 != 0 or not 0 < d <= _CPU_MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is not supported on the CPU (multiples of 8 up to "
                         f"{_CPU_MAX_HEAD_DIM})")
    if (hkv, d) != (spec["kv_heads"], spec["head_dim"]):
        raise ValueError(f"k/v [Hkv, D] = [{hkv}, {d}] differ from store {store_id}'s "
                         f"[kv_heads, head_dim] = [{spec['kv_heads']}, {spec['head_dim']}]")
    if q.dtype != jnp.dtype(spec["dtype"]):
        raise ValueError(f"q/k/v dtype {q.dtype} differs from store {store_id}'s {spec['dtype']}")
    if not 0 <= layer < spec["layers"]:
        raise ValueError(f"layer {layer} outside [0, {spec['layers']}) of store {store_id}")
    return spec


def attention(q, k, v, meta: AttnMeta, *, store_id: int, layer: int, scale: float) -> jax.Array:
    """Write this step's K/V into KV store `store_id` at `layer`, then attend causally.

    Packed ragged layout: the step's T rows hold S sequences back to back. Sequence i owns rows
    [seq_start[i], seq_start[i+1]); its n_i new tokens take positions
    [seq_len[i] - n_i, seq_len[i]) of slot seq_slot[i] (decode: n_i = 1; a prefill chunk
    continuing a cached prefix: n_i > 1 with seq_len[i] > n_i). Row r at position p writes
    k[r], v[r] at (slot, p, layer) and returns
    out[r] = softmax(scale * q[r] . K[0..p]) V[0..p] over that slot's positions [0, p], including
    rows written in this same call. Rows >= seq_start[S] are padding: output 0, nothing written;
    so are the rows of a sequence whose slot is -2 (jvt.runner.MASKED_SLOT; no error flagged).
    GQA/MQA: q head h reads kv head h // (Hq // Hkv).

    Safety: a sequence whose seq_len exceeds its slot's mapped capacity (reserve first), whose
    slot is out of range, or whose seq_len < n_i is skipped (output 0, nothing read or written)
    and the store's error flag is set; `KVStore.check()` raises.

    Mapping: the host op maps the store's pending extensions itself; the CUDA op maps nothing
    (it does no host work, so XLA may capture it in a CUDA graph): call `store.apply_pending()`
    after `reserve` and before dispatching (the engine's runner does), or a sequence past its
    mapped capacity is skipped and flagged as above.

    Args:
      q: [T, Hq, D] queries; k, v: [T, Hkv, D] this step's keys and values; one dtype, equal
        to the store's: bfloat16, float16 or (CPU only) float32. D: 64 or 128 on CUDA, a
        multiple of 8 up to 256 on the CPU.
      meta: int32 metadata, see jvt.types.AttnMeta (positions is not read by the op).
      store_id: the store's registry id (`KVStore.store_id`), a static attribute.
      layer: decoder layer in [0, layers), static.
      scale: softmax scale, static.

    Returns:
      out: [T, Hq, D] in q's dtype.
    """
    spec = _check_args(q, k, v, meta, store_id, layer, scale)
    register_targets()
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    operands = (q, k, v, meta.seq_start, meta.seq_slot, meta.seq_len)
    attrs = {"store_id": np.int32(store_id), "layer": np.int32(layer),
             "scale": np.float32(scale)}
    size = 1  # the host handler's workspace: unused, there for one call signature
    if spec["device"] >= 0:
        from jvt import _native

        t, hq, d = q.shape
        size = max(1, _native.attention_workspace_bytes(t, meta.seq_slot.shape[0], hq,
                                                        k.shape[1], d, _CUDA_DTYPE_CODES[q.dtype]))
    workspace = jax.ShapeDtypeStruct((size,), jnp.uint8)  # XLA-owned temporaries
    return jax.ffi.ffi_call(TARGET, (out, workspace))(*operands, **attrs)[0]


def _row_layout(meta: AttnMeta, num_rows: int, slots: int, max_tokens: int):
    """Per row: (valid, slot, position), by the op's rules with capacity = max_tokens."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    s = meta.seq_slot.shape[0]
    if s == 0:
        zeros = jnp.zeros(num_rows, jnp.int32)
        return jnp.zeros(num_rows, bool), zeros, zeros
    # The last sequence starting at or before the row (skips empty sequences).
    seq = jnp.clip(jnp.searchsorted(meta.seq_start, rows, side="right") - 1, 0, s - 1)
    start, end = meta.seq_start[seq], meta.seq_start[seq + 1]
    n, slot, length = end - start, meta.seq_slot[seq], meta.seq_len[seq]
    valid = ((rows >= start) & (rows < end) & (start >= 0) & (end <= num_rows) & (slot >= 0)
             & (slot < slots) & (length >= n) & (length <= max_tokens))
    pos = length - n + (rows - start)
    return valid, jnp.where(valid, slot, 0), jnp.where(valid, pos, 0)


def reference_attention(q, k_cache, v_cache, meta: AttnMeta, *, scale: float) -> jax.Array:
    """fp32 oracle of `attention` on explicit KV arrays that already hold this step's K/V.

    k_cache, v_cache: [slots, max_tokens, Hkv, D]. Returns [T, Hq, D] float32; padding rows and
    rows of sequences the op would skip (slot out of range, seq_len < n_i or > max_tokens) are 0.
    """
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    t, hq, d = q.shape
    slots, max_tokens, hkv, _ = k_cache.shape
    valid, slot, pos = _row_layout(meta, t, slots, max_tokens)
    qg = q.astype(jnp.float32).reshape(t, hkv, hq // hkv, d)
    keys = k_cache[slot].astype(jnp.float32)  # [T, max_tokens, Hkv, D]
    values = v_cache[slot].astype(jnp.float32)
    scores = jnp.einsum("tkgd,tskd->tkgs", qg, keys, precision="highest") * scale
    causal = jnp.arange(max_tokens)[None, :] <= pos[:, None]  # [T, max_tokens]
    scores = jnp.where(causal[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, values, precision="highest").reshape(t, hq, d)
    return jnp.where(valid[:, None, None], out, 0.0)


def reference_step(q, k, v, k_cache, v_cache, meta: AttnMeta, *, scale: float):
    """Functional stand-in for `attention`: scatter k/v into the arrays, then attend.

    k_cache, v_cache: [slots, max_tokens, Hkv, D]. Returns (out [T, Hq, D] in q's dtype,
    k_cache, v_cache) with this step's rows written (skipped sequences write nothing).
    """
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    slots, max_tokens = k_cache.shape[:2]
    valid, slot, pos = _row_layout(meta, q.shape[0], slots, max_tokens)
    slot = jnp.where(valid, slot, slots)  # out of bounds: dropped by the scatter
    k_cache = k_cache.at[slot, pos].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[slot, pos].set(v.astype(v_cache.dtype), mode="drop")
    out = reference_attention(q, k_cache, v_cache, meta, scale=scale)
    return out.astype(q.dtype), k_cache, v_cache

"""Measure checkpoint load time: conversion from safetensors vs the orbax params cache.

    python -m jvt.models.loadtime --model llama-3.2-1b [--dir /tmp/jvt-1b] [--cache-dir ...]

A preset has random weights and no files, so it is first saved as a Hugging Face checkpoint
(safetensors, 4 GB shards) in --dir (kept for reuse). Then, in one process: a first load that
converts and writes a fresh cache entry, a load served from that entry, and a load that
converts again with the cache off. Each time includes reading, device transfer and conversion,
up to params being ready on the default device. File reads come from the OS page cache after
the first one (drop caches as root for disk-cold numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax

from jvt.models import cache
from jvt.models.loader import load, read_hf_config, save_hf_checkpoint
from jvt.models.presets import PRESETS
from jvt.models.tokenizer import HFTokenizer


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn().params)
    return time.perf_counter() - start


def measure_load_time(model: str = "llama-3.2-1b", directory: str | None = None,
                      cache_dir: str | None = None) -> dict[str, float]:
    """Seconds of three loads of the checkpoint in directory (written from preset `model`
    first when it has no config.json): the first (converts, compiles the converters, writes
    the cache entry), one from the cache, and one converting again with the cache off."""
    directory = directory or os.path.join(tempfile.gettempdir(), f"jvt-hf-{model}")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        if model not in PRESETS:
            raise ValueError(f"{directory} holds no checkpoint and {model!r} is not a preset")
        save_hf_checkpoint(load(model), directory, max_shard_bytes=4 << 30)
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="jvt-cache-")
    config = read_hf_config(directory)
    shutil.rmtree(cache.entry_path(directory, config, cache_dir), ignore_errors=True)
    HFTokenizer(directory)  # imports transformers once, outside every timing
    return {
        "first (convert + cache write)": _timed(lambda: load(directory, cache_dir=cache_dir)),
        "cached": _timed(lambda: load(directory, cache_dir=cache_dir)),
        "convert only (no cache)": _timed(lambda: load(directory, use_cache=False)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b", help="preset to save, or any name "
                        "when --dir already holds a checkpoint")
    parser.add_argument("--dir", default=None, help="checkpoint dir (created from the preset)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: a temp dir)")
    args = parser.parse_args()
    times = measure_load_time(args.model, args.dir, args.cache_dir)
    print(f"device: {jax.devices()[0].device_kind}  model: {args.model}")
    print(f"{'load':<32}{'seconds':>10}")
    for name, seconds in times.items():
        print(f"{name:<32}{seconds:>10.2f}")


if __name__ == "__main__":
    main()

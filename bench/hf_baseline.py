"""Hugging Face transformers baseline: LlamaForCausalLM (PyTorch, SDPA attention, the model's
dtype) fed jvt's weights, converted in memory (no checkpoint written), greedy `generate`.

HF `generate` runs one static batch (no continuous batching): the batch sweep times it as
TTFT = a generate() of one new token, ITL = (full generate - TTFT) / (new tokens - 1).
"""

from __future__ import annotations

import time

import numpy as np

from jvt.models.config import ModelConfig
from jvt.models.loader import hf_config_dict, module_tensors


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_torch(x):
    """A jax array as a torch tensor: zero-copy through DLPack (same device)."""
    import torch

    return torch.from_dlpack(x)


def state_dict(module, device: str) -> dict:
    """The jvt module's weights as an HF LlamaForCausalLM state dict (transposes are views,
    copied on load)."""
    sd = {}
    for name, x, transposed in module_tensors(module):
        t = _to_torch(x)
        sd[name] = t.T if transposed else t
    return {k: v.to(device) for k, v in sd.items()}


def build(config: ModelConfig, module):
    """An HF LlamaForCausalLM in config.dtype on the torch device with jvt's weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.qkv_bias:
        raise ValueError("the HF baseline converts Llama-architecture weights only")
    device = torch_device()
    cfg = hf_config_dict(config)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf_cfg.architectures = cfg["architectures"]
    dtype = getattr(torch, config.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate the weights in their dtype, not fp32 first
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = model.load_state_dict(state_dict(module, device), strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_embeddings:
        model.tie_weights()
    model.eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def score(model, ids: list[int]) -> np.ndarray:
    """fp32 logits [len(ids), V] of one forward pass (the teacher-forced reference check)."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        return model(x).logits[0].float().cpu().numpy()


def generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[np.ndarray, float]:
    """Greedy generate of equal-length prompts; returns (new token ids [B, n], seconds)."""
    import torch

    with torch.inference_mode():
        x = torch.tensor(prompts, device=model.device)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return out[:, x.shape[1]:].cpu().numpy(), time.perf_counter() - t0

"""LLaMA-family models for jvt (installed as jvt.models): the Flax NNX module, config,
presets, loading (Hugging Face safetensors, GGUF), tokenizers.

    model = jvt.models.load("smollm2-135m")          # the real default model (a GGUF file)
    model = jvt.models.load("tiny")                  # a preset: random weights, byte tokenizer
    model = jvt.models.load("/path/to/checkpoint")   # a local HF checkpoint dir or .gguf file
    hidden = model.module(tokens, meta, store_id=store.store_id)   # model.module: nnx.Module
    logits = model.module.logits(hidden)
"""

from jvt.models import llama
from jvt.models.config import ModelConfig
from jvt.models.llama import Llama, init_module
from jvt.models.loader import (
    Model,
    load,
    load_tokenizer,
    locate_real_model,
    read_config,
    save_hf_checkpoint,
)
from jvt.models.presets import DEFAULT_MODEL, PRESETS, REAL_MODELS, preset_config
from jvt.models.tokenizer import ByteTokenizer, GGUFTokenizer, HFTokenizer, Tokenizer

__all__ = ["DEFAULT_MODEL", "PRESETS", "REAL_MODELS", "ByteTokenizer", "GGUFTokenizer",
           "HFTokenizer", "Llama",
           "Model", "ModelConfig", "Tokenizer", "init_module", "llama", "load", "load_tokenizer",
           "locate_real_model", "preset_config", "read_config", "save_hf_checkpoint"]

"""LLaMA-family models for jvt (installed as jvt.models): config, presets, loading, tokenizers.

    model = jvt.models.load("tiny")                  # a preset: random weights, byte tokenizer
    model = jvt.models.load("/path/to/checkpoint")   # a local Hugging Face checkpoint dir
    hidden = jvt.models.llama.forward(model.params, tokens, meta, config=model.config,
                                      store_id=store.store_id)
"""

from jvt.models import llama
from jvt.models.config import ModelConfig
from jvt.models.loader import Model, load, save_hf_checkpoint
from jvt.models.presets import PRESETS, preset_config
from jvt.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["PRESETS", "ByteTokenizer", "HFTokenizer", "Model", "ModelConfig", "Tokenizer",
           "llama", "load", "preset_config", "save_hf_checkpoint"]

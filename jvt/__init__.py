"""jvt: a JAX/XLA LLM inference engine whose KV cache lives in GPU virtual memory."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that
# `import jvt` stays cheap and does not initialise JAX backends.
_EXPORTS = {
    "Engine": "jvt.engine",
    "EngineConfig": "jvt.config",
    "Session": "jvt.session",
    "SamplingParams": "jvt.types",
    "RequestOutput": "jvt.types",
    "RequestMetrics": "jvt.types",
    "RequestError": "jvt.types",
    "StreamDelta": "jvt.types",
    "AttnMeta": "jvt.types",
    "KVStore": "jvt.kv",
    "KVCacheFull": "jvt.kv",
    "KVCapacityError": "jvt.kv",
    "ops": "jvt.ops",
}

__all__ = [
    "AttnMeta",
    "Engine",
    "EngineConfig",
    "KVCacheFull",
    "KVCapacityError",
    "KVStore",
    "RequestError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Session",
    "StreamDelta",
    "ops",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jvt' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if module == f"jvt.{name}" else getattr(mod, name)

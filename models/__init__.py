"""Model definitions (installed as jvt.models)."""

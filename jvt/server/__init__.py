"""The OpenAI-compatible HTTP server, `python -m jvt serve` (docs/server.md)."""

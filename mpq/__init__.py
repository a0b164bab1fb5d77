"""mpq: mixed 2/4/16-bit weight quantization and speculative early exit for Llama-family models."""

__version__ = "0.1.0"

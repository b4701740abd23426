"""Saffron Guard: safety-guided decoding (Saffron-1 tree search) as a library, CLI and service."""

__version__ = "0.1.0"

"""CLIF: non-confusing generation of customized concepts in diffusion models (ICML 2024)."""

__version__ = "0.1.0"

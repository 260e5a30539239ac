"""microlm: a from-scratch micro language model with a LoRA stage."""

__version__ = "0.1.0"

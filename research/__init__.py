"""Transfer learning for NLP in JAX: pretrained encoders as Flax pytrees on new task heads."""

__version__ = "0.1.0"

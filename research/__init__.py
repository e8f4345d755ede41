"""Transfer learning for NLP in JAX: pretrained encoders as Flax pytrees, grafted onto task heads."""

__version__ = "0.1.0"

"""Data layer: tfds builders for local files and catalog access (ArrayRecord, no TensorFlow),
tokenization, length-bucketed checkpointable batching (grain), and meta-learning episodes.

Entry points: :func:`build_iterator`, :func:`label_names`, :func:`default_data_config`.
"""

from research.data.input_pipeline import DataIterator, build_iterator, label_names
from research.data.registry import default_data_config

__all__ = ["DataIterator", "build_iterator", "default_data_config", "label_names"]

"""Data layer: tfds builders for local files and catalog access (ArrayRecord, no TensorFlow),
tokenization, length-bucketed checkpointable batching (grain), and meta-learning episodes.

Entry points: :func:`build_iterator`, :func:`label_names`, :func:`default_data_config`.

The names are imported on first use: a config file only needs :mod:`research.data.registry`
(``ml_collections``), and loading a config, or refusing a bad one, should not wait for jax,
grain and tensorflow-datasets to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from research.data.input_pipeline import DataIterator, build_iterator, label_names
  from research.data.registry import default_data_config

__all__ = ["DataIterator", "build_iterator", "default_data_config", "label_names"]

_HOME = {
  "DataIterator": "research.data.input_pipeline",
  "build_iterator": "research.data.input_pipeline",
  "label_names": "research.data.input_pipeline",
  "default_data_config": "research.data.registry",
}


def __getattr__(name: str) -> Any:
  if name not in _HOME:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(_HOME[name]), name)
  globals()[name] = value
  return value

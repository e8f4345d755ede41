"""One module per task kind: its loss, its metrics and how predictions are decoded.

Each task module exposes ``loss(logits, batch) -> (sum, weight)`` (jit-traceable; the trainer
divides the summed loss by the summed weight so gradient accumulation is exact),
``predict(logits) -> dict of arrays`` (jit-traceable) and
``metrics(predictions, gold, label_names=None) -> dict`` (host side, over a whole eval split).
"""

from __future__ import annotations

from types import ModuleType


def get(kind: str) -> ModuleType:
  """The task module for a head kind ('classification', 'tagging', 'regression', ...)."""
  from research.tasks import classification, regression, tagging

  modules = {"classification": classification, "regression": regression, "tagging": tagging}
  if kind not in modules:
    raise ValueError(f"unknown task kind {kind!r}; known: {sorted(modules)}")
  return modules[kind]

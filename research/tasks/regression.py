"""Sequence (or sequence-pair) regression, e.g. STS-B similarity: squared error, Pearson, Spearman.

Texts or text pairs with a float score each (:class:`~research.tasks.kind.TextKind` with float
labels), a pooled linear head of one output, squeezed. Predict mode writes ``value``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.data import tokenize
from research.tasks import register_kind
from research.tasks.kind import TextKind

METRICS = ("pearson", "spearman", "mse")


def loss(outputs: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed squared error over real examples and their count."""
  weights = batch["example_mask"].astype(jnp.float32)
  err = (outputs.astype(jnp.float32) - batch["labels"].astype(jnp.float32)) ** 2
  return jnp.sum(err * weights), jnp.sum(weights)


def predict(outputs: jax.Array, batch: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """The predicted score, per example."""
  return {"value": outputs.astype(jnp.float32)}


def _ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share the mean rank), as Spearman's rho needs."""
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(len(x), dtype=np.float64)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def metrics(
  predictions: dict[str, np.ndarray],
  gold: dict[str, np.ndarray],
  label_names: list[str] | None = None,
) -> dict[str, float]:
  """Pearson and Spearman correlations and the mean squared error over real rows."""
  keep = gold["example_mask"] > 0
  pred = predictions["value"][keep].astype(np.float64)
  true = gold["labels"][keep].astype(np.float64)
  corr = lambda a, b: float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() and b.std() else 0.0
  return {
    "pearson": corr(pred, true),
    "spearman": corr(_ranks(pred), _ranks(true)),
    "mse": float(np.mean((pred - true) ** 2)) if len(true) else 0.0,
    "examples": int(keep.sum()),
  }


@register_kind("regression")
class Regression(TextKind):
  """One float score per text or text pair."""

  metric_names = METRICS
  encoder = tokenize.TextEncoder(float_labels=True)
  layout = "scalar"

  # The module's functions are the kind's (they are also used on their own, e.g. in tests).
  loss = staticmethod(loss)
  predict = staticmethod(predict)
  metrics = staticmethod(metrics)

  def render(self, out, row, batch, labels, inputs):
    return {"value": float(out["value"][row])}

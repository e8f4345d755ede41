"""Sequence (or sequence-pair) classification: softmax cross-entropy, accuracy, F1.

Texts or text pairs with a class label each (:class:`~research.tasks.kind.TextKind`), a pooled
linear head of one output per class. Metrics: accuracy and macro-F1 over the classes, plus for
two-class tasks ``f1_<name of class 1>``, the F1 of class 1 as the positive class (GLUE's F1
for MRPC: ``f1_paraphrase``). Predict mode writes ``label`` and ``probs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.tasks import register_kind
from research.tasks.kind import TextKind

METRICS = ("accuracy", "f1")


def loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over real examples and their count (``example_mask`` weights rows)."""
  weights = batch["example_mask"].astype(jnp.float32)
  labels = jnp.maximum(batch["labels"], 0)  # Padding rows may carry -1; they weigh 0.
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * weights), jnp.sum(weights)


def predict(logits: jax.Array, batch: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Arg-max label and its probability, per example."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return {"label": jnp.argmax(logits, axis=-1), "prob": probs}


def class_f1(pred: np.ndarray, gold: np.ndarray, c: int) -> float | None:
  """F1 of class ``c`` as the positive class; None when it is neither gold nor predicted."""
  tp = np.sum((pred == c) & (gold == c))
  fp = np.sum((pred == c) & (gold != c))
  fn = np.sum((pred != c) & (gold == c))
  return None if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
  """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
  scores = [f for c in range(num_labels) if (f := class_f1(pred, gold, c)) is not None]
  return float(np.mean(scores)) if scores else 0.0


def metrics(
  predictions: dict[str, np.ndarray],
  gold: dict[str, np.ndarray],
  label_names: list[str] | None = None,
) -> dict[str, float]:
  """Accuracy and macro-F1 over the rows whose ``example_mask`` is set; with two classes and
  ``label_names`` also ``f1_<name of class 1>``, the F1 of class 1 as the positive class."""
  keep = gold["example_mask"] > 0
  pred, labels = predictions["label"][keep], gold["labels"][keep]
  num_labels = predictions["prob"].shape[-1]
  out = {
    "accuracy": float(np.mean(pred == labels)) if len(labels) else 0.0,
    "f1": macro_f1(pred, labels, num_labels),
    "examples": int(keep.sum()),
  }
  if num_labels == 2 and label_names:  # GLUE's F1 (MRPC, QQP): class 1 is the positive one.
    out[f"f1_{label_names[1]}"] = class_f1(pred, labels, 1) or 0.0
  return out


@register_kind("classification")
class Classification(TextKind):
  """One class per text or text pair."""

  metric_names = METRICS

  # The module's functions are the kind's (they are also used on their own, e.g. in tests).
  loss = staticmethod(loss)
  predict = staticmethod(predict)
  metrics = staticmethod(metrics)

  def render(self, out, row, batch, labels, inputs):
    probs = out["prob"][row]
    return {
      "label": labels[int(out["label"][row])],
      "probs": {name: round(float(p), 6) for name, p in zip(labels, probs)},
    }

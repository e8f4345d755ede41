"""Sequence classification: softmax cross-entropy, accuracy and macro-F1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
  """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
  scores = []
  for c in range(num_labels):
    tp = np.sum((pred == c) & (gold == c))
    fp = np.sum((pred == c) & (gold != c))
    fn = np.sum((pred != c) & (gold == c))
    if tp + fp + fn == 0:
      continue
    scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores)) if scores else 0.0


def metrics(
  predictions: dict[str, np.ndarray],
  gold: dict[str, np.ndarray],
  label_names: list[str] | None = None,
) -> dict[str, float]:
  """Accuracy and macro-F1 over the rows whose ``example_mask`` is set."""
  keep = gold["example_mask"] > 0
  pred, labels = predictions["label"][keep], gold["labels"][keep]
  num_labels = predictions["prob"].shape[-1]
  return {
    "accuracy": float(np.mean(pred == labels)) if len(labels) else 0.0,
    "f1": macro_f1(pred, labels, num_labels),
    "examples": int(keep.sum()),
  }

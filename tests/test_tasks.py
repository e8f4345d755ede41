"""Task modules: losses and metrics against independent references."""

import numpy as np


def test_regression_metrics_match_numpy_and_ranks():
  from research.tasks import regression

  pred = np.array([0.1, 0.4, 0.4, 2.0, 3.0])
  true = np.array([0.0, 1.0, 0.5, 2.5, 2.0])
  out = regression.metrics({"value": pred}, {"labels": true, "example_mask": np.ones(5)})
  np.testing.assert_allclose(out["pearson"], np.corrcoef(pred, true)[0, 1])
  # Ranks with a tie: pred -> [1, 2.5, 2.5, 4, 5], true -> [1, 3, 2, 5, 4].
  np.testing.assert_allclose(
    out["spearman"], np.corrcoef([1, 2.5, 2.5, 4, 5], [1, 3, 2, 5, 4])[0, 1]
  )


def test_classification_macro_f1_and_accuracy_ignore_padding_rows():
  from research.tasks import classification

  probs = np.eye(3)[[0, 1, 2, 1, 0]]
  gold = {"labels": np.array([0, 1, 1, 1, 2]), "example_mask": np.array([1, 1, 1, 1, 0])}
  out = classification.metrics({"label": probs.argmax(-1), "prob": probs}, gold)
  assert out["accuracy"] == 0.75 and out["examples"] == 4
  # Per class F1: c0 = 1, c1 = 2*2/(2*2+0+1) = 0.8, c2 = 0 (one false positive).
  np.testing.assert_allclose(out["f1"], (1 + 0.8 + 0) / 3)

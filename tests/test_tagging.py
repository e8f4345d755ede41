"""NER metrics: our entity-level scores equal seqeval's on the same predictions."""

import numpy as np
import pytest

from research.tasks import tagging

seqeval_metrics = pytest.importorskip("seqeval.metrics")


def random_sequences(rng, n, scheme_tags):
  return [list(rng.choice(scheme_tags, size=rng.integers(1, 15))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_seqeval_agreement_on_random_iob_sequences(seed):
  rng = np.random.default_rng(seed)
  tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "I-MISC"]
  gold = random_sequences(rng, 200, tags)
  pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in seq] for seq in gold]
  ours = tagging.entity_scores(gold, pred)
  assert abs(ours["f1"] - seqeval_metrics.f1_score(gold, pred)) < 1e-9
  assert abs(ours["precision"] - seqeval_metrics.precision_score(gold, pred)) < 1e-9
  assert abs(ours["recall"] - seqeval_metrics.recall_score(gold, pred)) < 1e-9
  report = seqeval_metrics.classification_report(gold, pred, output_dict=True)
  for kind, scores in ours["per_type"].items():
    if kind in report:
      assert abs(scores["f1"] - report[kind]["f1-score"]) < 1e-9, kind


def test_seqeval_agreement_bioes():
  rng = np.random.default_rng(7)
  tags = ["O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "E-LOC", "S-LOC"]
  gold = random_sequences(rng, 200, tags)
  pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in seq] for seq in gold]
  assert abs(tagging.entity_scores(gold, pred)["f1"] - seqeval_metrics.f1_score(gold, pred)) < 1e-9


def test_first_subword_decoding_and_metrics():
  names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
  labels = np.array([[-100, 1, -100, 2, 0, 3, -100], [-100, 0, 3, 4, -100, -100, -100]])
  pred = np.array([[0, 1, 4, 2, 0, 3, 0], [0, 0, 3, 0, 1, 1, 1]])
  out = tagging.metrics({"label": pred}, {"labels": labels, "example_mask": np.ones(2)}, names)
  # Gold: [PER(0-1), LOC(3)], [LOC(1-2)]; predicted: [PER(0-1), LOC(3)], [LOC(1)].
  assert out["precision"] == 2 / 3 and out["recall"] == 2 / 3
  assert out["per_type"]["PER"]["f1"] == 1.0 and out["accuracy"] == 6 / 7

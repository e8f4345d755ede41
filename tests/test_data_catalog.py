"""tfds catalog data sets through the same pipeline, via ``tfds.testing.mock_data``.

No download happens here: the catalog builder's code gives the features, and mock_data the
examples (text as ``str``, where real data gives ``bytes``). Selected by ``pytest -k builder``.
"""

from __future__ import annotations

import numpy as np
import pytest

from research import tasks
from research.data import build_iterator, default_data_config, label_names, registry

tfds = pytest.importorskip("tensorflow_datasets")


def test_builder_catalog_glue_sst2_mock(tmp_path, tokenizer):
  cfg = default_data_config("glue_sst2", data_dir=str(tmp_path), max_length=64)
  with tfds.testing.mock_data(num_examples=50):
    assert label_names(cfg) == ["negative", "positive"]
    train = build_iterator(cfg, tokenizer, "train", batch_size=8, train=True, seed=0)
    batches = [next(train) for _ in range(8)]
    evals = list(build_iterator(cfg, tokenizer, "validation", batch_size=16, train=False))
  for b in batches:
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in cfg.buckets
    assert set(np.unique(b["labels"])) <= {0, 1}
  assert len(evals) == 4 and evals[-1]["example_mask"].sum() == 50 - 48
  assert not (tmp_path / "tokenized").exists()  # mocked data is never cached on disk
  with tfds.testing.mock_data(num_examples=20):  # nor in memory: a new mock, new examples
    assert build_iterator(cfg, tokenizer, "validation", batch_size=16, train=False).num_batches == 2


def test_builder_catalog_conll2003_mock(tmp_path, tokenizer):
  """The catalog conll2003 has the same feature names and tags as our local builder."""
  cfg = default_data_config("conll2003_catalog", data_dir=str(tmp_path))
  tagging = tasks.get("tagging").encoder
  assert label_names(cfg, tagging) == label_names(default_data_config("conll2003"), tagging)

  def source(builder, split, **kwargs):
    del builder, split, kwargs
    return [
      {"tokens": np.array(["Peter", "Blackburn", "visits", "Bonn"]), "ner": np.array([1, 2, 0, 5])}
    ] * 6

  with tfds.testing.mock_data(as_data_source_fn=source):
    batch = next(build_iterator(cfg, tokenizer, "dev", batch_size=8, train=False, encoder=tagging))
  names = label_names(cfg, tagging)
  row = batch["labels"][0]
  assert [names[i] for i in row[row >= 0]] == ["B-PER", "I-PER", "O", "B-LOC"]


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_data_set_has_a_valid_default_config(name):
  """``default_data_config(name)`` with no overrides passes its own validation."""
  cfg = default_data_config(name)
  assert cfg.name == name and cfg.buckets[-1] >= cfg.max_length

"""N-way K-shot episode sampling (``pytest -k episode``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from research.data import default_data_config, episodes, label_names

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def banking_fixture(tmp_path_factory):
  return default_data_config(
    "banking77",
    manual_dir=str(FIXTURES / "banking77"),
    data_dir=str(tmp_path_factory.mktemp("tfds")),
    verify_checksums=False,
  )


LABELS = np.repeat(np.arange(6), [8, 6, 7, 6, 9, 5])  # class c has the given number of examples


def test_episode_sampler_shapes_and_disjoint():
  sampler = episodes.EpisodeSampler(LABELS, [0, 1, 2, 4], n_way=3, k_shot=2, q_query=3, seed=1)
  for i in range(20):
    ep = sampler.sample(i)
    assert ep.support.shape == (6,) and ep.query.shape == (9,)
    np.testing.assert_array_equal(ep.support_labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ep.query_labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert len(set(ep.classes)) == 3 and set(ep.classes) <= {0, 1, 2, 4}
    assert not set(ep.support) & set(ep.query)
    # Episode-local label j is data-set class classes[j].
    np.testing.assert_array_equal(LABELS[ep.support], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(LABELS[ep.query], ep.classes[ep.query_labels])


def test_episode_sampler_seeded():
  a = episodes.EpisodeSampler(LABELS, range(6), n_way=2, k_shot=1, q_query=2, seed=7)
  b = episodes.EpisodeSampler(LABELS, range(6), n_way=2, k_shot=1, q_query=2, seed=7)
  c = episodes.EpisodeSampler(LABELS, range(6), n_way=2, k_shot=1, q_query=2, seed=8)
  for i in range(5):
    np.testing.assert_array_equal(a.sample(i).support, b.sample(i).support)
    np.testing.assert_array_equal(a.sample(i).query, b.sample(i).query)
  assert any((a.sample(i).support != c.sample(i).support).any() for i in range(5))


def test_episode_sampler_errors():
  names = [f"intent_{i}" for i in range(6)]
  with pytest.raises(ValueError, match=r"n_way=5 but class split 'test' has only 3 classes"):
    episodes.EpisodeSampler(LABELS, [0, 1, 2], n_way=5, k_shot=1, q_query=1, split_name="test")
  with pytest.raises(
    ValueError, match=r"= 7 examples needed per class.*'intent_1' has 6.*'intent_5' has 5"
  ):
    episodes.EpisodeSampler(LABELS, range(6), n_way=2, k_shot=2, q_query=5, class_names=names)


def test_episode_class_splits_fixture(banking_fixture):
  splits = episodes.class_splits(banking_fixture)
  assert {k: len(v) for k, v in splits.items()} == {"train": 3, "valid": 3, "test": 3}
  all_names = [n for v in splits.values() for n in v]
  assert len(all_names) == len(set(all_names)) == len(label_names(banking_fixture))


def test_episode_iterator_fixture(banking_fixture, tokenizer):
  kw = dict(n_way=3, k_shot=2, q_query=3, episodes_per_batch=4, seed=0)
  it = episodes.build_episode_iterator(banking_fixture, tokenizer, "train", **kw)
  batches = [next(it) for _ in range(3)]
  names = label_names(banking_fixture)
  train_ids = {names.index(n) for n in episodes.class_splits(banking_fixture)["train"]}
  for b in batches:
    t = b["support_input_ids"].shape[-1]
    assert t in banking_fixture.buckets
    assert b["support_input_ids"].shape == (4, 6, t)
    assert b["query_input_ids"].shape == (4, 9, t)
    assert b["support_labels"].shape == (4, 6) and b["query_labels"].shape == (4, 9)
    assert b["classes"].shape == (4, 3) and set(b["classes"].ravel()) <= train_ids
    assert all(v.dtype == np.int32 for v in b.values())
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  again = episodes.build_episode_iterator(banking_fixture, tokenizer, "train", **kw)
  again.set_state(state)
  for x, y in zip(expected, [next(again) for _ in range(2)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Two processes share the global batch's episodes, two each.
  parts = [
    next(
      episodes.build_episode_iterator(
        banking_fixture, tokenizer, "train", process_index=p, process_count=2, **kw
      )
    )
    for p in range(2)
  ]
  first = batches[0]
  for k in first:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), first[k])


def test_episode_iterator_errors(banking_fixture, tokenizer):
  with pytest.raises(ValueError, match="only 3 classes"):
    episodes.build_episode_iterator(
      banking_fixture, tokenizer, "test", n_way=4, k_shot=1, q_query=1
    )
  # atm_support (5 examples) is a meta-test class of the fixture.
  with pytest.raises(ValueError, match=r"'atm_support' has 5"):
    episodes.build_episode_iterator(
      banking_fixture, tokenizer, "test", n_way=2, k_shot=3, q_query=3
    )
  with pytest.raises(ValueError, match="Unknown class split"):
    episodes.build_episode_iterator(
      banking_fixture, tokenizer, "meta", n_way=2, k_shot=1, q_query=1
    )


@pytest.mark.parametrize("name,sizes", [("banking77", (25, 25, 27)), ("clinc150", (50, 50, 50))])
def test_episode_real_class_splits(shared_data, tokenizer, name, sizes):
  if not (shared_data / name / "full.jsonl").is_file():
    pytest.skip(f"{name} not in ./data")
  cfg = default_data_config(name)
  for run in ("01", "02", "03", "04", "05"):
    cfg.few_shot.run = run
    splits = episodes.class_splits(cfg)
    assert tuple(len(splits[s]) for s in ("train", "valid", "test")) == sizes
    assert not set(splits["train"]) & set(splits["valid"])
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["valid"]) & set(splits["test"])
  cfg.few_shot.run = "01"
  it = episodes.build_episode_iterator(
    cfg, tokenizer, "test", n_way=5, k_shot=5, q_query=5, episodes_per_batch=2
  )
  b = next(it)
  assert b["support_input_ids"].shape[:2] == (2, 25) and b["query_input_ids"].shape[:2] == (2, 25)

"""Bucketed, checkpointable batching (``pytest -k bucket``): shapes, padding, state, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from research import tasks
from research.data import batching, build_iterator, default_data_config, label_names

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def sst2_fixture(tmp_path_factory):
  return default_data_config(
    "sst2",
    manual_dir=str(FIXTURES / "sst2"),
    data_dir=str(tmp_path_factory.mktemp("tfds")),
    verify_checksums=False,
  )


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_bucket_of():
  assert batching.bucket_of(1, (8, 16)) == 8
  assert batching.bucket_of(8, (8, 16)) == 8
  assert batching.bucket_of(9, (8, 16)) == 16
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    batching.bucket_of(17, (8, 16))


def test_bucket_train_batches_fixture(sst2_fixture, tokenizer):
  it = build_iterator(sst2_fixture, tokenizer, "train", batch_size=8, train=True, seed=1)
  batches = take(it, 12)  # 5 batches per epoch: crosses two epoch boundaries
  for b in batches:
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "example_mask"}
    bsz, t = b["input_ids"].shape
    assert bsz == 8 and t in sst2_fixture.buckets
    assert b["labels"].shape == (8,) and b["example_mask"].dtype == np.float32
    assert all(v.dtype == np.int32 for k, v in b.items() if k != "example_mask")
    assert b["example_mask"].sum() == 8
    assert (b["attention_mask"].sum(1) > 0).all()
    # A row's longest sequence fits: T is the smallest bucket holding it.
    longest = b["attention_mask"].sum(1).max()
    assert t == batching.bucket_of(int(longest), sst2_fixture.buckets)
  assert len({b["input_ids"].shape for b in batches}) <= len(sst2_fixture.buckets)
  # Each epoch visits each example at most once; different epochs are shuffled differently.
  first = [tuple(r) for b in batches[:5] for r in b["input_ids"]]
  second = [tuple(r) for b in batches[5:10] for r in b["input_ids"]]
  assert first != second


def test_bucket_state_restore_fixture(sst2_fixture, tokenizer):
  kw = dict(batch_size=8, train=True, seed=3)
  it = build_iterator(sst2_fixture, tokenizer, "train", **kw)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 6)
  again = build_iterator(sst2_fixture, tokenizer, "train", **kw)
  again.set_state(state)
  assert_same(take(again, 6), expected)
  other = build_iterator(sst2_fixture, tokenizer, "train", batch_size=4, train=True, seed=3)
  with pytest.raises(ValueError, match="batch_size"):
    other.set_state(state)


def test_bucket_seed_changes_order(sst2_fixture, tokenizer):
  a = take(build_iterator(sst2_fixture, tokenizer, "train", batch_size=8, train=True, seed=0), 3)
  b = take(build_iterator(sst2_fixture, tokenizer, "train", batch_size=8, train=True, seed=0), 3)
  c = take(build_iterator(sst2_fixture, tokenizer, "train", batch_size=8, train=True, seed=1), 3)
  assert_same(a, b)
  assert any(
    x["input_ids"].shape != y["input_ids"].shape or (x["input_ids"] != y["input_ids"]).any()
    for x, y in zip(a, c)
  )


def test_bucket_num_epochs(sst2_fixture, tokenizer):
  it = build_iterator(sst2_fixture, tokenizer, "train", batch_size=8, train=True, num_epochs=2)
  assert len(list(it)) == 2 * (40 // 8)


def test_bucket_eval_pads_last_batch(sst2_fixture, tokenizer):
  it = build_iterator(sst2_fixture, tokenizer, "validation", batch_size=4, train=False)
  batches = list(it)
  assert len(batches) == it.num_batches == 2
  np.testing.assert_array_equal(batches[1]["example_mask"], [1, 0, 0, 0])
  assert batches[1]["input_ids"].shape[0] == 4
  labels = np.concatenate([b["labels"][b["example_mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, [1, 0, 1, 0, 1])  # data order, no shuffling
  again = list(build_iterator(sst2_fixture, tokenizer, "validation", batch_size=4, train=False))
  assert_same(batches, again)


@pytest.mark.parametrize("train", [True, False])
def test_bucket_processes_disjoint(sst2_fixture, tokenizer, train):
  split = "train" if train else "validation"
  full = take(build_iterator(sst2_fixture, tokenizer, split, batch_size=8, train=train), 1)[0]
  parts = [
    take(
      build_iterator(
        sst2_fixture,
        tokenizer,
        split,
        batch_size=8,
        train=train,
        process_index=p,
        process_count=2,
      ),
      1,
    )[0]
    for p in range(2)
  ]
  for k in full:
    assert parts[0][k].shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k], err_msg=k)


def test_bucket_bad_batch_sizes(sst2_fixture, tokenizer):
  with pytest.raises(ValueError, match="not divisible"):
    build_iterator(sst2_fixture, tokenizer, "train", batch_size=6, train=True, process_count=4)
  with pytest.raises(ValueError, match="batch_size"):
    build_iterator(sst2_fixture, tokenizer, "train", batch_size=64, train=True)
  with pytest.raises(ValueError, match="no split 'test'"):
    build_iterator(sst2_fixture, tokenizer, "test", batch_size=8, train=False)


def test_bucket_seq2seq_fixture(tmp_path, tokenizer):
  cfg = default_data_config(
    "multi30k",
    manual_dir=str(FIXTURES / "multi30k"),
    data_dir=str(tmp_path),
    verify_checksums=False,
  )
  seq2seq = tasks.get("seq2seq").encoder
  assert label_names(cfg, seq2seq) == []
  batches = list(
    build_iterator(cfg, tokenizer, "validation", batch_size=4, train=False, encoder=seq2seq)
  )
  assert len(batches) == 1
  b = batches[0]
  keys = {"input_ids", "attention_mask", "token_type_ids", "decoder_input_ids"}
  keys |= {"decoder_attention_mask", "labels", "example_mask"}
  assert set(b) == keys
  t = b["input_ids"].shape[1]
  assert t in cfg.buckets and all(b[k].shape == (4, t) for k in keys - {"example_mask"})
  np.testing.assert_array_equal(b["example_mask"], [1, 1, 1, 0])
  bos, eos = tokenizer.cls_token_id, tokenizer.sep_token_id
  assert (b["decoder_input_ids"][:, 0] == bos).all()
  for row in range(3):
    n = int(b["decoder_attention_mask"][row].sum())
    labels, dec = b["labels"][row], b["decoder_input_ids"][row]
    # Teacher forcing: labels are the decoder inputs shifted left, ending in EOS; -100 after.
    np.testing.assert_array_equal(labels[: n - 1], dec[1:n])
    assert labels[n - 1] == eos and (labels[n:] == -100).all()
  assert (b["labels"][3] == -100).all()  # the padding row
  assert tokenizer.decode(b["labels"][0][b["labels"][0] >= 0], skip_special_tokens=True) == (
    "ein mann fahrt fahrrad."  # the uncased MiniLM tokenizer lower-cases and strips accents
  )
  assert tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) == "a man is riding a bike."


def test_bucket_sst2_real(shared_data, tokenizer):
  """Real SST-2 train: <= len(buckets) shapes, < 25% padding, exact resume after k batches."""
  if not (shared_data / "sst2" / "train.tsv").is_file():
    pytest.skip("sst2 not in ./data")
  cfg = default_data_config("sst2")
  it = build_iterator(cfg, tokenizer, "train", batch_size=32, train=True, seed=0)
  assert it.num_examples == 67349 and it.num_batches == 67349 // 32
  traces = []

  @jax.jit
  def consume(batch):
    traces.append(batch["input_ids"].shape)  # runs once per compilation
    return (batch["input_ids"] * batch["attention_mask"]).sum()

  for batch in take(it, 300):
    consume(batch)
  assert 1 < len(traces) <= len(cfg.buckets), traces
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 20)
  assert len(it.stats.shapes) <= len(cfg.buckets)
  assert it.stats.padding_fraction < 0.25, it.stats.padding_fraction
  assert it.planned_padding_fraction() < 0.25
  # The whole epoch's plan, not only the batches drawn so far.
  plan = batching.train_plan(it._tok.lengths, 32, 0, 0, cfg.pool_batches)
  fraction = batching.padding_fraction(it._tok, plan, cfg.buckets)
  assert fraction < 0.25, fraction
  shapes = {batching.padded_length(it._tok, rows, cfg.buckets) for rows in plan}
  assert shapes <= set(cfg.buckets)
  again = build_iterator(cfg, tokenizer, "train", batch_size=32, train=True, seed=0)
  again.set_state(state)
  assert_same(take(again, 20), expected)
  # Every example of the epoch appears at most once; only n % 32 are left out.
  flat = plan.ravel()
  assert len(np.unique(flat)) == len(flat) == (67349 // 32) * 32

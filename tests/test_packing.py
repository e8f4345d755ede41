"""Sequence packing (research.data.packing): the packer, and that a packed batch gives each
example exactly the outputs, loss and gradients it gets unpacked, with no leak between the
examples of a row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.data import batching, packing
from research.data.tokenize import Ragged, Tokenized
from research.models.config import EncoderConfig
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.tasks import classification, tagging
from research.train.steps import apply_model

WIDTH, K = 32, 4


def _tokenized(n: int, seed: int = 0, tags: bool = False) -> Tokenized:
  """``n`` random examples of 2..14 tokens: class labels, or per-token tags (-100 on the first
  token, as tagging puts on [CLS])."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 15, n)
  ids = [rng.integers(5, 128, int(t)).tolist() for t in lengths]
  ragged = {
    "input_ids": Ragged.from_rows(ids),
    "token_type_ids": Ragged.from_rows([[0] * len(r) for r in ids]),
  }
  pads = {"input_ids": 0, "token_type_ids": 0}
  scalars = {}
  if tags:
    labels = [[-100, *rng.integers(0, 5, len(r) - 1).tolist()] for r in ids]
    ragged["labels"] = Ragged.from_rows(labels)
    pads["labels"] = -100
  else:
    scalars["labels"] = rng.integers(0, 3, n).astype(np.int32)
  return Tokenized(ragged, scalars, lengths.astype(np.int64), pads, {})


def _batches(tok: Tokenized) -> tuple[dict, dict, np.ndarray]:
  """The same examples as one packed batch and one unpacked batch (in packed slot order)."""
  rows = packing.pack(tok.lengths, WIDTH, K, seed=0)
  packed = packing.assemble(tok, rows, WIDTH)
  order = rows[rows >= 0]
  plain = batching.assemble(tok, order, int(order[0]), WIDTH)
  return packed, plain, rows


def _model(layout: str, pooling: str = "mean", **encoder):
  cfg = EncoderConfig.tiny(**encoder)
  head = HeadConfig(layout=layout, num_labels=5 if layout == "token" else 3, pooling=pooling)
  model = make_task_model(cfg, {"t": head})
  return model, init_params(model, jax.random.key(0))


def _run(model, params, batch, loss):
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def total(p):
    out = apply_model(model, p, batch, "t")
    t, w = loss(out, batch)
    return t / w, out

  (value, out), grads = jax.value_and_grad(total, has_aux=True)(params)
  return value, out, grads


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_packing_packer_places_every_example_once_within_width():
  lengths = np.random.default_rng(1).integers(1, 30, 1000)
  rows = packing.pack(lengths, 32, 6, seed=3, pool=256)
  placed = rows[rows >= 0]
  assert sorted(placed.tolist()) == list(range(1000))
  assert packing.row_lengths(lengths, rows).max() <= 32
  assert ((rows >= 0).sum(axis=1) <= 6).all() and ((rows >= 0).sum(axis=1) >= 1).all()
  # Slots fill from the left, so slot k is segment k + 1 and empty slots trail.
  filled = rows >= 0
  assert (filled[:, :-1] >= filled[:, 1:]).all()
  frac = packing.padding_fraction(lengths, rows, 32)
  assert frac == pytest.approx(1 - lengths.sum() / (len(rows) * 32))
  assert frac < 0.1  # First-fit decreasing over pools: rows nearly full.
  assert (packing.pack(lengths, 32, 6, seed=3, pool=256) == rows).all()  # Deterministic.
  with pytest.raises(ValueError, match="exceeds the row width"):
    packing.pack(lengths, 16, 6, seed=0)


def test_packing_assemble_lays_out_segments_and_positions():
  tok = _tokenized(40, tags=True)
  packed, _, rows = _batches(tok)
  for r, row in enumerate(rows):
    at = 0
    for k, i in enumerate(row[row >= 0]):
      n = int(tok.lengths[i])
      assert (packed["input_ids"][r, at : at + n] == tok.ragged["input_ids"][i]).all()
      assert (packed["labels"][r, at : at + n] == tok.ragged["labels"][i]).all()
      assert (packed["segment_ids"][r, at : at + n] == k + 1).all()
      assert (packed["position_ids"][r, at : at + n] == np.arange(n)).all()
      at += n
    assert (packed["segment_ids"][r, at:] == 0).all() and (packed["labels"][r, at:] == -100).all()
  assert packed["example_mask"].shape == rows.shape
  assert packed["example_mask"].sum() == 40


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_packing_classification_equals_unpacked(pooling):
  tok = _tokenized(24)
  packed, plain, rows = _batches(tok)
  model, params = _model("sequence", pooling)
  loss_p, out_p, grads_p = _run(model, params, packed, classification.loss)
  loss_u, out_u, grads_u = _run(model, params, plain, classification.loss)
  assert out_p.shape == (*rows.shape, 3)
  np.testing.assert_allclose(np.asarray(out_p)[rows >= 0], np.asarray(out_u), atol=1e-5)
  assert abs(float(loss_p) - float(loss_u)) < 1e-5
  assert _max_diff(grads_p, grads_u) < 1e-5


def test_packing_roberta_positions_equal_unpacked():
  """A family with a position offset (RoBERTa: padding id 1, positions from 2)."""
  tok = _tokenized(24)
  packed, plain, rows = _batches(tok)
  model, params = _model("sequence", "cls", position_offset=2, max_position_embeddings=40)
  _, out_p, grads_p = _run(model, params, packed, classification.loss)
  _, out_u, grads_u = _run(
    model,
    params,
    {**plain, "input_ids": np.where(plain["attention_mask"] > 0, plain["input_ids"], 1)},
    classification.loss,
  )
  np.testing.assert_allclose(np.asarray(out_p)[rows >= 0], np.asarray(out_u), atol=1e-5)
  assert _max_diff(grads_p, grads_u) < 1e-5


def test_packing_mpnet_equals_unpacked():
  """MPNet: positions from 2 (padding id 1) and a relative position bias over the whole row,
  which is the same per segment because it depends only on key - query offsets."""
  from research.models.mpnet import PADDING_IDX, MPNetConfig

  tok = _tokenized(24)
  packed, plain, rows = _batches(tok)
  cfg = MPNetConfig.tiny(max_position_embeddings=40, vocab_size=128)
  model = make_task_model(cfg, {"t": HeadConfig(layout="sequence", num_labels=3, pooling="mean")})
  params = init_params(model, jax.random.key(0))
  ids = np.where(plain["attention_mask"] > 0, plain["input_ids"], PADDING_IDX)
  _, out_p, grads_p = _run(model, params, packed, classification.loss)
  _, out_u, grads_u = _run(model, params, {**plain, "input_ids": ids}, classification.loss)
  np.testing.assert_allclose(np.asarray(out_p)[rows >= 0], np.asarray(out_u), atol=1e-5)
  assert _max_diff(grads_p, grads_u) < 1e-5


def test_packing_tagging_equals_unpacked():
  tok = _tokenized(24, tags=True)
  packed, plain, rows = _batches(tok)
  model, params = _model("token")
  loss_p, out_p, grads_p = _run(model, params, packed, tagging.loss)
  loss_u, out_u, grads_u = _run(model, params, plain, tagging.loss)
  # Token outputs: each example's tokens, read back from its place in the packed row.
  lengths = tok.lengths
  j = 0
  for r, row in enumerate(rows):
    at = 0
    for i in row[row >= 0]:
      n = int(lengths[i])
      np.testing.assert_allclose(out_p[r, at : at + n], out_u[j, :n], atol=1e-5)
      at, j = at + n, j + 1
  assert abs(float(loss_p) - float(loss_u)) < 1e-5
  assert _max_diff(grads_p, grads_u) < 1e-5


def test_packing_no_leak_between_examples_of_a_row():
  tok = _tokenized(24)
  packed, _, rows = _batches(tok)
  r = int(np.argmax((rows >= 0).sum(axis=1)))  # A row with several examples.
  assert (rows[r] >= 0).sum() >= 2
  model, params = _model("sequence", "mean")
  run = jax.jit(lambda b: apply_model(model, params, b, "t"))
  before = np.asarray(run({k: jnp.asarray(v) for k, v in packed.items()}))
  changed = dict(packed, input_ids=packed["input_ids"].copy())
  seg = changed["segment_ids"][r] == 1
  changed["input_ids"][r, seg] = (changed["input_ids"][r, seg] + 7) % 128
  after = np.asarray(run({k: jnp.asarray(v) for k, v in changed.items()}))
  assert not np.array_equal(before[r, 0], after[r, 0])
  keep = np.ones(rows.shape, bool)
  keep[r, 0] = False
  np.testing.assert_array_equal(before[keep], after[keep])  # Bit-identical.


def test_packing_rejects_pooler_and_crf():
  tok = _tokenized(8)
  packed, _, _ = _batches(tok)
  batch = {k: jnp.asarray(v) for k, v in packed.items()}
  model, params = _model("sequence", "pooler")
  with pytest.raises(ValueError, match="pooling"):
    apply_model(model, params, batch, "t")
  crf_model = make_task_model(EncoderConfig.tiny(), {"t": HeadConfig("token", 5, crf=True)})
  crf_params = init_params(crf_model, jax.random.key(0))
  with pytest.raises(ValueError, match="CRF"):
    apply_model(crf_model, crf_params, batch, "t")


def test_packing_train_and_evaluate_tiny(tmp_path):
  """The real trainer on configs/sst2_minilm.py:tiny with packed training batches."""
  import json

  from train_util import tiny_config

  from research.train.trainer import train_and_evaluate

  config = tiny_config(steps=4, checkpoint_every=4, eval_every=4, log_every=2, batch_size=8)
  config.tasks.sst2.data.packing = True
  config.tasks.sst2.head.pooling = "mean"  # The pooler reads a row's position 0 only.
  train_and_evaluate(config, str(tmp_path))
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses and all(np.isfinite(losses))
  assert json.loads((tmp_path / "results.json").read_text())["eval"]


def test_packing_with_the_pooler_or_a_crf_fails_before_the_run_writes(tmp_path):
  from train_util import load_config_module, tiny_config

  from research import errors
  from research.train.trainer import train_and_evaluate

  config = tiny_config(steps=4)
  config.tasks.sst2.data.packing = True  # The SST-2 config's head pools with 'pooler'.
  with pytest.raises(errors.UsageError, match=r"tasks\.sst2\.head\.pooling='pooler'"):
    train_and_evaluate(config, str(tmp_path / "pooler"))
  assert not (tmp_path / "pooler").exists() or not any((tmp_path / "pooler").iterdir())
  ner = load_config_module("conll03_minilm").get_config("tiny,crf")
  with ner.unlocked():
    ner.tasks.conll03.data.packing = True
  with pytest.raises(errors.UsageError, match=r"tasks\.conll03\.head\.crf=True"):
    train_and_evaluate(ner, str(tmp_path / "crf"))


def test_packing_build_iterator_fixture(tokenizer, tmp_path):
  """The pipeline's packed branch on the SST-2 fixture: shapes, one epoch holds each example at
  most once, less padding than buckets, resumable state, disjoint process slices."""
  from pathlib import Path

  from research.data import build_iterator, default_data_config

  cfg = default_data_config(
    "sst2",
    manual_dir=str(Path(__file__).parent / "fixtures" / "data" / "sst2"),
    data_dir=str(tmp_path),
    verify_checksums=False,
    max_length=32,
    buckets=(16, 32),
  )
  plain = build_iterator(cfg, tokenizer, "train", batch_size=4, train=True, seed=1)
  cfg.update(packing=True, packing_max_per_row=4)
  kw = dict(batch_size=4, train=True, seed=1)
  it = build_iterator(cfg, tokenizer, "train", num_epochs=1, **kw)
  assert it.planned_padding_fraction() < plain.planned_padding_fraction()
  batches = list(it)
  assert len(batches) == it.num_batches
  for b in batches:
    assert b["example_mask"].shape == b["labels"].shape == (4, 4)
    assert b["segment_ids"].shape == b["input_ids"].shape and b["input_ids"].shape[1] in (16, 32)
    assert (b["attention_mask"] == (b["segment_ids"] > 0)).all()
  seen = sum(float(b["example_mask"].sum()) for b in batches)
  assert 0 < seen <= it.num_examples
  again = build_iterator(cfg, tokenizer, "train", num_epochs=1, **kw)
  next(again)
  state = again.get_state()
  resumed = build_iterator(cfg, tokenizer, "train", num_epochs=1, **kw)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["input_ids"], batches[1]["input_ids"])
  halves = [
    next(build_iterator(cfg, tokenizer, "train", process_index=p, process_count=2, **kw))
    for p in range(2)
  ]
  for key in ("input_ids", "segment_ids", "labels", "example_mask"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[0][key])

"""Seq2seq: the encoder-decoder's tree, init modes as graft rules, label-smoothed loss, BLEU, the
tiny run end to end with predict mode (``pytest -k seq2seq``; the smoke run is in
test_smoke.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_util import load_config_module

from research import paths
from research.models import seq2seq
from research.models.config import EncoderConfig
from research.models.encoder import Encoder
from research.tasks import seq2seq as task
from research.transfer import graft as graft_lib


def _init(model, seq_len=6):
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(model.init)(jax.random.key(1), ids, jnp.ones_like(ids))["params"]


@pytest.fixture(scope="module")
def trees():
  """A BERT-like source tree (with pooler) and a fresh encoder-decoder target."""
  enc = EncoderConfig.tiny(num_layers=2)
  source = {"encoder": _init(Encoder(enc))}
  model = seq2seq.make_model(enc, ("mt",), {"num_layers": 2})
  return model, source, _init(model)


def test_seq2seq_tree_has_encoder_decoder_heads(trees):
  _, source, target = trees
  assert sorted(target) == ["decoder", "encoder", "heads"]
  flat = paths.flatten(target)
  assert "decoder/layer_1/cross_attention/query/kernel" in flat
  assert "decoder/layer_0/attention/query/kernel" in flat
  assert flat["heads/mt/bias"].shape == (128,)
  # The encoder keeps the encoder's paths (minus the pooler, which nothing reads).
  enc_paths = {p for p in paths.flatten(source) if "pooler" not in p}
  assert enc_paths == {p for p in flat if p.startswith("encoder/")}


def test_seq2seq_bert2rnd_graft_reports_encoder_transferred_decoder_at_init(trees):
  _, source, target = trees
  init, rules = seq2seq.init_plan("bert2rnd")
  assert init == "pretrained"
  _, report = graft_lib.graft(target, source, rules)
  transferred = dict(report.transferred)
  assert set(transferred) == {p for p in paths.flatten(target) if p.startswith("encoder/")}
  assert all(t == s for t, s in transferred.items())
  assert set(report.left_at_init) == {p for p in paths.flatten(target) if p[:7] != "encoder"}
  assert set(report.unused_in_source) == {"encoder/pooler/kernel", "encoder/pooler/bias"}
  assert "left at init            decoder/layer_0/attention/query/kernel" in report.table()
  assert seq2seq.init_plan("rnd2rnd") == ("scratch", ())


def test_seq2seq_bert2bert_graft_reports_the_mapping(trees):
  _, source, target = trees
  _, rules = seq2seq.init_plan("bert2bert")
  grafted, report = graft_lib.graft(target, source, rules)
  mapping = dict(report.transferred)
  assert (
    mapping["decoder/layer_1/attention/query/kernel"] == "encoder/layer_1/attention/query/kernel"
  )
  assert mapping["decoder/layer_0/ffn/output/bias"] == "encoder/layer_0/ffn/output/bias"
  assert mapping["decoder/layer_0/output_norm/scale"] == "encoder/layer_0/output_norm/scale"
  assert mapping["decoder/embeddings/word_embeddings/embedding"] == (
    "encoder/embeddings/word_embeddings/embedding"
  )
  at_init = set(report.left_at_init)
  assert "decoder/layer_0/cross_attention/key/kernel" in at_init
  assert "decoder/layer_1/cross_attention_norm/scale" in at_init
  assert at_init == {p for p in paths.flatten(target) if "cross_attention" in p or "heads" in p}
  table = report.table()
  assert "decoder/layer_1/attention/query/kernel" in table
  flat, src = paths.flatten(grafted), paths.flatten(source)
  np.testing.assert_array_equal(
    flat["decoder/layer_1/ffn/intermediate/kernel"], src["encoder/layer_1/ffn/intermediate/kernel"]
  )


def test_seq2seq_label_smoothed_loss_equals_the_one_hot_form():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
  labels = np.array([[3, 1, 6, -100], [0, 2, -100, -100]], np.int32)
  batch = {"labels": jnp.asarray(labels), "example_mask": jnp.array([1.0, 1.0])}
  for eps in (0.0, 0.1):
    total, weight = task.loss(logits, batch, label_smoothing=eps)
    target = optax.smooth_labels(jax.nn.one_hot(np.maximum(labels, 0), 7), eps)
    ce = optax.softmax_cross_entropy(logits, target)
    np.testing.assert_allclose(total, jnp.sum(ce * (labels != -100)), rtol=1e-5)
    assert float(weight) == 5.0
  batch["example_mask"] = jnp.array([1.0, 0.0])  # Padding rows weigh nothing.
  assert float(task.loss(logits, batch)[1]) == 3.0


def test_seq2seq_bleu_is_sacrebleu():
  import sacrebleu

  hyps = ["ein mann fahrt fahrrad.", "zwei hunde spielen im schnee."]
  refs = ["ein mann fahrt ein fahrrad.", "zwei hunde spielen im schnee."]
  assert task.bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs]).score
  assert task.bleu(refs, refs) == pytest.approx(100.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """configs/multi30k_bert2rnd.py:tiny through the real trainer, warm-started BERT2BERT from a
  tiny random BERT checkpoint (HF layout) with MiniLM's vocabulary and tokenizer."""
  from research.train.trainer import train_and_evaluate
  from research.transfer import hf

  enc = EncoderConfig.tiny(vocab_size=30522)
  hf_dir = hf.save_pretrained(
    tmp_path_factory.mktemp("tiny_hf"),
    enc,
    {"encoder": _init(Encoder(enc))},
    tokenizer_from=hf.MINILM,
  )
  workdir = tmp_path_factory.mktemp("m30k_tiny")
  config = load_config_module("multi30k_bert2rnd").get_config("tiny")
  config.model.update(checkpoint=str(hf_dir), init="bert2bert", encoder_overrides={})
  results = train_and_evaluate(config, str(workdir))
  return workdir, results


def test_seq2seq_tiny_run_writes_bleu_and_the_graft_mapping(tiny_run):
  workdir, _ = tiny_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["config"] == "multi30k_bert2rnd" and saved["steps"] == 10
  metrics = saved["eval"]["multi30k"]
  assert {"bleu", "bleu_beam2", "bleu_greedy", "loss", "token_accuracy"} <= set(metrics)
  assert 0.0 <= metrics["bleu"] <= 100.0 and metrics["bleu"] == metrics["bleu_beam2"]
  assert metrics["examples"] == 3
  report = (workdir / "graft_report.txt").read_text()
  line = next(x for x in report.splitlines() if "decoder/layer_0/attention/key/kernel" in x)
  assert line.split() == [
    "transferred",
    "decoder/layer_0/attention/key/kernel",
    "encoder/layer_0/attention/key/kernel",
  ]
  assert "left at init            decoder/layer_0/cross_attention/key/kernel" in report


def test_seq2seq_predict_mode_translates_line_by_line(tiny_run, tmp_path):
  from research.predict import predict_file

  workdir, _ = tiny_run
  (tmp_path / "in.txt").write_text("A man is riding a bike.\n\nTwo dogs play in the snow.\n")
  out = predict_file(workdir, tmp_path / "in.txt", tmp_path / "out.jsonl")
  records = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["line"] for r in records] == [1, 2, 3]
  assert isinstance(records[0]["translation"], str) and isinstance(records[2]["translation"], str)
  assert records[1] == {"line": 2, "text": "", "error": "empty line"}


def test_seq2seq_eval_joins_batches_of_different_bucket_widths():
  from research.train.trainer import _concat

  a, b = np.ones((2, 3), np.int32), np.full((1, 5), 7, np.int32)
  labels = _concat([a, b], "labels")
  assert labels.shape == (3, 5) and (labels[:2, 3:] == -100).all() and (labels[2] == 7).all()
  assert _concat([a, b], "token")[:2, 3:].tolist() == [[0, 0], [0, 0]]
  assert _concat([np.ones(2), np.zeros(3)], "example_mask").shape == (5,)


def test_seq2seq_pretrained_encoder_trains_at_a_tenth_of_the_lr():
  """At the decoder's lr the pretrained encoder collapsed on Multi30k (README: Translation)."""
  module = load_config_module("multi30k_bert2rnd")
  for variant in ("cpu", "cpu,init=bert2bert", ""):
    rules = dict(module.get_config(variant).optim.lr_multipliers)
    assert rules == {"encoder/.*": module.ENCODER_LR_FACTOR} and module.ENCODER_LR_FACTOR == 0.1
  assert not module.get_config("cpu,init=rnd2rnd").optim.lr_multipliers

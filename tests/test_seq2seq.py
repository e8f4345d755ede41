"""Seq2seq: the encoder-decoder's tree, init modes as graft rules, label-smoothed loss, the tiny
runs end to end (BERT2RND with a cased target vocabulary, the from-scratch Transformer with a
joint one) with predict mode (``pytest -k seq2seq``; the smoke runs are in test_smoke.py,
metrics and vocabularies in test_translation.py)."""

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
from research.train import checkpoints as ckpt_lib
from research.train.state import build_model
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """configs/multi30k_bert2rnd.py:tiny through the real trainer, warm-started BERT2RND from a
  tiny random BERT checkpoint (HF layout) with MiniLM's vocabulary and tokenizer; the decoder
  writes a cased BPE trained on the fixture's German."""
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
  config.model.update(checkpoint=str(hf_dir), init="bert2rnd", encoder_overrides={})
  results = train_and_evaluate(config, str(workdir))
  return workdir, results


def test_seq2seq_tiny_run_writes_bleu_chrf_signatures_and_the_vocabulary(tiny_run):
  workdir, _ = tiny_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["config"] == "multi30k_bert2rnd" and saved["steps"] == 10
  metrics = saved["eval"]["multi30k"]
  keys = {"bleu", "bleu_signature", "chrf", "chrf_signature", "length_ratio"}
  assert keys | {"bleu_beam2", "bleu_greedy", "chrf_greedy", "loss", "token_accuracy"} <= set(
    metrics
  )
  assert 0.0 <= metrics["bleu"] <= 100.0 and metrics["bleu"] == metrics["bleu_beam2"]
  assert metrics["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|")
  assert metrics["chrf"] == metrics["chrf_beam2"] and "nc:6|nw:0" in metrics["chrf_signature"]
  assert metrics["examples"] == 3
  # metrics.jsonl holds only numbers; the signatures are in results.json.
  evals = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert "bleu_signature" not in evals[-1] and "bleu" in evals[-1]
  # The decoder's vocabulary is the trained one, kept in the run directory.
  vocab = json.loads((workdir / "target_tokenizer.json").read_text())
  assert len(vocab["model"]["vocab"]) <= 300
  params = ckpt_lib.load_params(workdir, prefer="best")[0]
  assert params["decoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0] == 300
  assert params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape[0] == 30522
  report = (workdir / "graft_report.txt").read_text()
  line = next(x for x in report.splitlines() if "encoder/layer_0/attention/key/kernel" in x)
  assert line.split()[0] == "transferred"
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


def test_seq2seq_predict_mode_reads_the_run_directory_vocabulary(tiny_run, tmp_path):
  """Predict mode never trains (nor takes from the cache) a vocabulary the run lacks."""
  import shutil

  from research.predict import predict_file

  workdir, _ = tiny_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "target_tokenizer.json").unlink()
  (tmp_path / "in.txt").write_text("A cat sleeps.\n")
  with pytest.raises(FileNotFoundError, match=r"target_tokenizer\.json: the run's trained target"):
    predict_file(copy, tmp_path / "in.txt", tmp_path / "out.jsonl")


def test_seq2seq_bert2bert_needs_the_checkpoint_vocabulary():
  module = load_config_module("multi30k_bert2rnd")
  config = module.get_config("init=bert2bert")
  assert config.tasks.multi30k.vocab.target == "pretrained"
  config = module.get_config("tiny")
  config.model.init = "bert2bert"
  with pytest.raises(ValueError, match=r"bert2bert.*target vocabulary must be the checkpoint's"):
    build_model(config, {"multi30k": 0})
  config = load_config_module("multi30k_transformer").get_config("tiny")
  config.model.init = "bert2rnd"
  with pytest.raises(ValueError, match=r"vocab\.source=.joint. gives the encoder a new vocab"):
    build_model(config, {"multi30k": 0})


def test_seq2seq_transformer_tiny_learns_cased_german_and_predicts_it(tmp_path):
  """The from-scratch recipe on the fixture, trained until it reproduces its training pairs:
  predict mode then writes cased German with umlauts, byte for byte the reference."""
  from research.predict import predict_file
  from research.train.trainer import train_and_evaluate

  config = load_config_module("multi30k_transformer").get_config("tiny,steps=150")
  config.model.dropout = 0.0
  config.model.encoder_overrides = dict(config.model.encoder_overrides, attention_dropout=0.0)
  config.optim.update(lr=1e-2, warmup_steps=10)
  config.tasks.multi30k.loss.label_smoothing = 0.0
  config.tasks.multi30k.data.splits.eval = "train"
  config.tasks.multi30k.decode = dict(beam_sizes=(1,), alpha=0.6, max_length=32)
  results = train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval"]["multi30k"]["bleu"] > 90, results["eval"]["multi30k"]
  (tmp_path / "in.txt").write_text("A man is riding a bike.\nA cat sleeps.\n")
  out = predict_file(tmp_path / "run", tmp_path / "in.txt", tmp_path / "out.jsonl")
  got = [json.loads(x)["translation"] for x in out.read_text().splitlines()]
  assert got == ["Ein Mann fährt Fahrrad.", "Eine Katze schläft."]


def test_seq2seq_eval_joins_batches_of_different_bucket_widths():
  from research.train.trainer import _concat

  a, b = np.ones((2, 3), np.int32), np.full((1, 5), 7, np.int32)
  labels = _concat([a, b], "labels")
  assert labels.shape == (3, 5) and (labels[:2, 3:] == -100).all() and (labels[2] == 7).all()
  assert _concat([a, b], "token")[:2, 3:].tolist() == [[0, 0], [0, 0]]
  assert _concat([np.ones(2), np.zeros(3)], "example_mask").shape == (5,)


def test_seq2seq_pretrained_encoder_trains_at_a_tenth_of_the_lr():
  """At the decoder's lr the pretrained encoder collapsed on Multi30k (docs/results.md)."""
  module = load_config_module("multi30k_bert2rnd")
  for variant in ("lr=5e-4", "init=bert2bert", ""):
    rules = dict(module.get_config(variant).optim.lr_multipliers)
    assert rules == {"encoder/.*": module.ENCODER_LR_FACTOR} and module.ENCODER_LR_FACTOR == 0.1
  assert not module.get_config("init=rnd2rnd").optim.lr_multipliers


def test_seq2seq_comparison_shares_the_baseline_budget_and_sweep():
  """BERT2RND vs the from-scratch Transformer: same steps, batch, schedule, sweep protocol."""
  from launch import sweep

  base = load_config_module("multi30k_transformer")
  warm = load_config_module("multi30k_bert2rnd")
  a, b = base.get_config(), warm.get_config()
  for key in ("steps", "batch_size", "eval_every", "best_metric"):
    assert a.train[key] == b.train[key], key
  assert a.train.best_metric == "multi30k/bleu"
  for key in ("lr", "schedule", "warmup_steps", "b2", "weight_decay"):
    assert a.optim[key] == b.optim[key], key
  assert a.tasks.multi30k.loss.to_dict() == b.tasks.multi30k.loss.to_dict()
  assert a.tasks.multi30k.decode.to_dict() == b.tasks.multi30k.decode.to_dict()
  assert dict(a.tasks.multi30k.vocab) == dict(b.tasks.multi30k.vocab, source="joint")
  for module in (base, warm):
    lrs = sweep.expand(module.get_sweep())
    assert [p.overrides for p in lrs] == [{"optim.lr": lr} for lr in base.LRS]
    seeds = sweep.expand(module.get_sweep("lr=1e-3"))
    assert len(base.LRS) >= 3 and [p.overrides for p in seeds] == [{"seed": 0}, {"seed": 1}]
    assert module.get_config("seed=1,lr=1e-3").seed == 1

"""Grafting across families onto and out of the pretrained encoder-decoders, each with its report.

- MiniLM's BERT encoder onto the encoder of a BART of MiniLM's shape, built at random by the
  tiny-config mechanism (``model.family='bart'`` over MiniLM's checkpoint, resized by
  ``model.encoder_overrides``), by ``bart.BERT_ENCODER_RULES``: the report's counts, and every
  grafted leaf bitwise the source's.
- A T5 checkpoint's encoder alone as an SST-2 classifier (``pooling='mean'``) through the real
  trainer: the encoder transferred, the decoder and ``lm_head`` reported unused in the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from test_seq2seq_peft import t5_checkpoint

from research import config_lib, paths
from research.models import seq2seq
from research.models.encoder_decoder import bart
from research.transfer import graft as graft_lib
from research.transfer import hf

REPO = Path(__file__).resolve().parents[1]
# A BART of MiniLM's encoder shape (the vocabulary, 30522, comes from its config.json); a
# one-layer decoder keeps the test small.
MINILM_BART = dict(
  hidden_size=384,
  encoder_layers=6,
  encoder_heads=12,
  encoder_ffn_size=1536,
  decoder_layers=1,
  decoder_heads=12,
  decoder_ffn_size=1536,
)


def test_graft_minilm_encoder_onto_bart_encoder_by_rules(minilm_dir):
  import ml_collections

  from research.train.state import encoder_config

  model_cfg = ml_collections.ConfigDict(
    dict(checkpoint=str(minilm_dir), family="bart", encoder_overrides=MINILM_BART, peft=None)
  )
  cfg = encoder_config(model_cfg)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.share_embeddings) == (30522, 384, True)
  model = seq2seq.make_model(cfg, ("t",))
  target = jax.jit(lambda r: model.init(r, np.zeros((1, 8), np.int32))["params"])(jax.random.key(0))
  _, source = hf.load_pretrained(minilm_dir)
  grafted, report = graft_lib.graft(target, source, bart.BERT_ENCODER_RULES)
  print(report.table())
  # Per layer q/k/v/output and FFN kernels and biases (12) and two LayerNorms (4), six layers;
  # the word table and the embedding LayerNorm (3).
  assert len(report.transferred) == 6 * 16 + 3
  assert sorted(report.unused_in_source) == [
    "encoder/embeddings/position_embeddings/embedding",
    "encoder/embeddings/token_type_embeddings/embedding",
    "encoder/pooler/bias",
    "encoder/pooler/kernel",
  ]
  flat_target = paths.flatten(target)
  assert len(report.left_at_init) == len(flat_target) - len(report.transferred)
  assert not report.reinitialised
  at_init = set(report.left_at_init)
  assert "encoder/embeddings/position_embeddings/embedding" in at_init
  assert all(
    p.startswith("decoder/") or "position" in p or p == "final_logits_bias" for p in at_init
  )
  assert ("encoder/layer_5/ffn_norm/scale", "encoder/layer_5/output_norm/scale") in (
    report.transferred
  )
  src, out = paths.flatten(source), paths.flatten(grafted)
  for t, s in report.transferred:
    np.testing.assert_array_equal(np.asarray(out[t]), np.asarray(src[s]), err_msg=t)
  for t in report.left_at_init:
    np.testing.assert_array_equal(np.asarray(out[t]), np.asarray(flat_target[t]), err_msg=t)


def test_graft_t5_encoder_alone_as_sst2_classifier(tmp_path, minilm_dir):
  from research.train.trainer import train_and_evaluate

  source = t5_checkpoint(minilm_dir, tmp_path / "t5")
  config = config_lib.load_module(REPO / "configs/sst2_minilm.py").get_config("tiny")
  # The tiny variant's data and steps, over the T5 checkpoint's own (tiny) architecture.
  config.model.update(checkpoint=str(source), init="pretrained")
  config.model.encoder_overrides = {}  # (update would merge into the tiny sizes)
  config.tasks.sst2.head.pooling = "mean"  # T5's encoder has no pooler.
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))

  report = (run / "graft_report.txt").read_text()
  print(report)
  _, loaded = hf.load_pretrained(source)
  leaves = paths.flatten(loaded)
  encoder = [p for p in leaves if p.startswith("encoder/")]
  unused = [p for p in leaves if not p.startswith("encoder/")]
  # The decoder (and an untied lm_head, when the checkpoint stores one).
  assert "decoder" in {p.split("/", 1)[0] for p in unused}
  assert all(p.startswith(("decoder/", "lm_head/")) for p in unused)
  head = [line for line in report.splitlines() if line.startswith("left at init")]
  assert head and all(" heads/sst2/" in line for line in head)
  summary = f"graft: {len(encoder)} transferred, {len(head)} left at init, {len(unused)} unused"
  assert summary in report
  listed = {line.split()[-1] for line in report.splitlines() if line.startswith("unused in source")}
  assert listed == set(unused)
  results = json.loads((run / "results.json").read_text())
  assert results["steps"] == config.train.steps
  assert np.isfinite(results["eval"]["sst2"]["loss"])

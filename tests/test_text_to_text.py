"""Classification as text to text on T5 (task kind ``text_to_text``, configs/sst2_t5.py).

The tiny config trains, evaluates by rank classification and predicts from the command line,
and predict mode labels the dev fixture as evaluation scored it; rank classification's scores
are each label word's summed log-likelihood as transformers' T5ForConditionalGeneration
computes it; a checkpoint made by transformers is fine-tuned with every leaf grafted (and the
``head=encoder`` comparison takes its encoder alone); a family without a seq2seq model and bad
label words are refused in one line (``pytest -k text_to_text`` or ``-k t5``).
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from train_util import REPO, load_config_module

from research import tasks
from research.data import batching
from research.subprocess_env import child_env
from research.tasks import classification, seq2seq, text_to_text
from research.transfer import hf

TOL = 1e-5
SIZES = dict(
  d_model=32,
  d_kv=8,
  d_ff=37,
  num_layers=2,
  num_heads=4,
  relative_attention_num_buckets=16,
  dropout_rate=0.0,
)


def _cli(*args: str) -> None:
  out = subprocess.run(
    [sys.executable, "-m", "research.main", *args],
    cwd=REPO,
    env=child_env(),
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]


def test_sst2_t5_text_to_text_tiny_trains_then_predicts_as_evaluated(tmp_path, minilm_dir):
  run = tmp_path / "run"
  _cli("--config=configs/sst2_t5.py:tiny", f"--workdir={run}")
  results = json.loads((run / "results.json").read_text())
  assert results["steps"] == 10
  scores = results["eval"]["sst2"]
  assert {"accuracy", "f1", "f1_positive", "token_accuracy", "loss", "examples"} <= set(scores)
  assert np.isfinite(scores["loss"]) and 0.0 <= scores["accuracy"] <= 1.0
  # Predict mode on the dev fixture's sentences gives the labels evaluation scored.
  dev = (REPO / "tests/fixtures/data/sst2/dev.tsv").read_text().splitlines()[1:]
  texts, gold = zip(*(line.rsplit("\t", 1) for line in dev))
  sentences = tmp_path / "dev.txt"
  sentences.write_text("".join(f"{t}\n" for t in texts))
  _cli("--mode=predict", f"--workdir={run}", f"--input={sentences}")
  rows = [json.loads(line) for line in (run / "predictions" / "dev.jsonl").open()]
  assert len(rows) == len(texts)
  assert all(r["label"] in ("negative", "positive") for r in rows)
  assert all(abs(sum(r["probs"].values()) - 1.0) < 1e-5 for r in rows)
  names = ["negative", "positive"]
  accuracy = np.mean([names.index(r["label"]) == int(g) for r, g in zip(rows, gold)])
  assert accuracy == pytest.approx(scores["accuracy"])


def _checkpoint(tokenizer_dir, directory, **sizes):
  """A random transformers T5 on MiniLM's tokenizer (its vocabulary, pad and [SEP] as end
  token), saved with the tokenizer files: what ``checkpoint=`` names on a user's machine."""
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.T5Config(
    vocab_size=30522, pad_token_id=0, decoder_start_token_id=0, eos_token_id=102, **sizes
  )
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  model.save_pretrained(directory)
  for name in hf.TOKENIZER_FILES:
    if (tokenizer_dir / name).is_file():
      (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
  return directory, model


def test_t5_rank_classification_scores_equal_transformers(tmp_path, minilm_dir, tokenizer):
  """Each label word's summed log-likelihood equals transformers' (words of different lengths,
  a padded batch); the hook's label is the arg-max and its metrics are classification's."""
  import torch

  from research.models import seq2seq as seq2seq_models

  directory, theirs = _checkpoint(minilm_dir, tmp_path / "ckpt", **SIZES)
  cfg, params = hf.load_pretrained(directory)
  model = seq2seq_models.make_model(cfg, ("sst2",))
  words = text_to_text.LabelWords(
    tokenizer,
    tokenizer,
    decoder_start=0,
    names=("negative", "neutral", "positive"),
    words=("bad", "good", "so so"),
    prefix="sst2 sentence: ",
  )
  texts = ["a charming mess", "tedious and dull", "it is fine i guess , nothing more", "wow"]
  texts += ["the worst film of the year", "an utter delight", "so so", "bad"]
  enc = seq2seq.encode_pairs(words, words.sources(texts), [""] * len(texts), 32, 2)
  batch = batching.assemble(enc, np.arange(len(texts)), fill=0, length=16)
  ours = np.asarray(text_to_text.make_scorer(model, "sst2", words, 8)(params, batch)["scores"])

  dec, lab = text_to_text.candidates(words, 8)
  assert list((lab != seq2seq.IGNORE).sum(1)) == [3, 3, 4]  # [CLS] word(s) [SEP]
  expected = np.zeros_like(ours)
  as_torch = lambda x: torch.from_numpy(np.asarray(x)).long()
  for k in range(len(words.words)):
    real = lab[k] != seq2seq.IGNORE
    with torch.no_grad():
      logits = theirs(
        input_ids=as_torch(batch["input_ids"]),
        attention_mask=as_torch(batch["attention_mask"]),
        decoder_input_ids=as_torch(np.tile(dec[k][real], (len(texts), 1))),
      ).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
    gold = np.take_along_axis(logp, lab[k][real][None, :, None].repeat(len(texts), 0), -1)
    expected[:, k] = gold[..., 0].sum(-1)
  assert np.max(np.abs(ours - expected)) <= TOL, (ours, expected)
  assert len(set(expected.argmax(-1))) > 1  # The rows do not all pick one word.

  # The hook ranks the words: its label is the arg-max of the scores, its metrics are the
  # classification kind's on those labels.
  batch["class_label"] = np.array([0, 1, 2, 2, 0, 1, 1, 0], np.int32)
  task_cfg = SimpleNamespace(data=SimpleNamespace(target_max_length=8))
  got = text_to_text.make_evaluate(model, "sst2", task_cfg, words)(params, [batch], lambda b: b)
  ranked = {"label": expected.argmax(-1), "prob": np.ones_like(expected) / 3}
  gold = {"labels": batch["class_label"], "example_mask": batch["example_mask"]}
  assert got == pytest.approx(classification.metrics(ranked, gold, list(words.names)))


def test_sst2_t5_checkpoint_grafts_every_leaf_both_ways(tmp_path, minilm_dir):
  """``tiny,checkpoint=DIR``: text-to-text fine-tunes the whole model, every leaf from DIR;
  ``head=encoder`` takes the encoder alone (the decoder unused, the new head at init)."""
  import jax

  from research.train.trainer import train_and_evaluate

  sizes = dict(SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  source, _ = _checkpoint(minilm_dir, tmp_path / "ckpt", **sizes)
  _, loaded = hf.load_pretrained(source)
  leaves = len(jax.tree_util.tree_leaves(loaded))
  encoder = len(jax.tree_util.tree_leaves(loaded["encoder"]))
  module = load_config_module("sst2_t5")
  for head, line in [
    ("decoder", f"graft: {leaves} transferred, 0 left at init, 0 unused in source"),
    ("encoder", f"graft: {encoder} transferred, 2 left at init, {leaves - encoder} unused"),
  ]:
    config = module.get_config(f"tiny,checkpoint={source},head={head}")
    assert config.model.init == "pretrained" and config.model.checkpoint == str(source)
    run = tmp_path / head
    train_and_evaluate(config, str(run))
    assert line in (run / "graft_report.txt").read_text(), head
    results = json.loads((run / "results.json").read_text())["eval"]["sst2"]
    assert {"accuracy", "f1"} <= set(results), head


def test_text_to_text_refuses_encoders_and_bad_label_words(minilm_dir):
  from research.train.state import encoder_config

  kind = tasks.get("text_to_text")
  config = load_config_module("sst2_minilm").get_config("tiny")
  with pytest.raises(ValueError, match=r"needs a pretrained encoder-decoder.*bert"):
    kind.build_model(config, encoder_config(config.model))
  with pytest.raises(ValueError, match="needs a pretrained encoder-decoder"):
    kind.tokenizer(config, "sst2", None)
  get = lambda words: text_to_text.label_words({"label_words": words}, ["negative", "positive"])
  assert get({}) == ("negative", "positive")
  assert get({"positive": "great"}) == ("negative", "great")
  with pytest.raises(ValueError, match="not label names"):
    get({"good": "great"})
  with pytest.raises(ValueError, match="share a word"):
    get({"positive": "negative"})


def test_text_to_text_prompt_is_in_the_tokenized_cache_key(tokenizer):
  """The prefix and the words change the encoding, so they key the tokenized-split cache."""
  from research.data import tokenize

  make = lambda **kw: text_to_text.LabelWords(
    tokenizer, tokenizer, decoder_start=0, names=("negative", "positive"), **kw
  )
  base = dict(words=("negative", "positive"), prefix="sst2 sentence: ")
  keys = {
    tokenize.tokenizer_fingerprint(make(**{**base, **change}))
    for change in ({}, {"prefix": ""}, {"words": ("bad", "good")}, {"pair_prefix": " | "})
  }
  assert len(keys) == 4
  assert tokenize.tokenizer_fingerprint(make(**base)) in keys  # Stable across objects.

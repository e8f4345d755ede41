"""Pretrained encoder-decoder families as translation models through the real trainer: each
family's Multi30k config trains and translates from the command line (``tiny``: a random model
on the committed fixture), and a checkpoint made by transformers is fine-tuned whole, every
weight grafted and the trained model exported back in a form transformers loads
(``pytest -k <family>``)."""

import json
import subprocess
import sys

import bart_like
import numpy as np
import pytest

from research import config_lib
from research.data.locations import repo_root
from research.subprocess_env import child_env
from research.transfer import hf

REPO = repo_root()
# BART's and Marian's tiny shape (tests/bart_like.py), without dropout, on MiniLM's vocabulary.
_BART_SIZES = {
  **{k: v for k, v in bart_like.SIZES.items() if k != "vocab_size"},
  "dropout": 0.0,
  "attention_dropout": 0.0,
}
# family -> (config, transformers model class, its config class, tiny sizes of that config)
FAMILIES = {
  "t5": (
    "configs/multi30k_t5.py",
    "T5ForConditionalGeneration",
    "T5Config",
    dict(
      d_model=32,
      d_kv=8,
      d_ff=37,
      num_layers=2,
      num_heads=4,
      feed_forward_proj="gated-gelu",
      tie_word_embeddings=False,
      relative_attention_num_buckets=16,
      dropout_rate=0.0,
    ),
  ),
  "bart": (
    "configs/multi30k_bart.py",
    "BartForConditionalGeneration",
    "BartConfig",
    {**_BART_SIZES, "forced_eos_token_id": None},
  ),
  "marian": (
    "configs/multi30k_marian.py",
    "MarianMTModel",
    "MarianConfig",
    _BART_SIZES,
  ),
}


def _cli(*args: str) -> subprocess.CompletedProcess:
  out = subprocess.run(
    [sys.executable, "-m", "research.main", *args],
    cwd=REPO,
    env=child_env(),
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_multi30k_tiny_trains_then_translates_from_the_command_line(tmp_path, minilm_dir, family):
  config = FAMILIES[family][0]
  run = tmp_path / "run"
  _cli(f"--config={config}:tiny", f"--workdir={run}")
  results = json.loads((run / "results.json").read_text())
  assert results["steps"] == 10
  scores = results["eval"]["multi30k"]
  assert {"bleu", "chrf", "bleu_signature", "bleu_greedy", "bleu_beam2"} <= set(scores)
  assert np.isfinite(scores["loss"])
  sentences = tmp_path / "in.en.txt"
  sentences.write_text("A man rides a bike.\nTwo dogs play in the snow.\n")
  _cli("--mode=predict", f"--workdir={run}", f"--input={sentences}")
  rows = [json.loads(line) for line in (run / "predictions" / "in.en.jsonl").open()]
  assert len(rows) == 2 and all(isinstance(r["translation"], str) for r in rows)


def _checkpoint(family: str, tokenizer_dir, directory):
  """A random transformers model of ``family`` on MiniLM's tokenizer (its vocabulary size and
  pad id), saved with the tokenizer files: what ``checkpoint=`` names on a user's machine."""
  import torch
  import transformers

  _, model_cls, config_cls, sizes = FAMILIES[family]
  torch.manual_seed(0)
  cfg = getattr(transformers, config_cls)(
    vocab_size=30522, pad_token_id=0, decoder_start_token_id=0, eos_token_id=102, **sizes
  )
  getattr(transformers, model_cls)(cfg).eval().save_pretrained(directory)
  for name in hf.TOKENIZER_FILES:
    if (tokenizer_dir / name).is_file():
      (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
  return directory


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_multi30k_checkpoint_is_fine_tuned_whole_and_exports_to_transformers(
  tmp_path, minilm_dir, family
):
  import transformers

  from research.train.trainer import train_and_evaluate

  source = _checkpoint(family, minilm_dir, tmp_path / "ckpt")
  config_file = FAMILIES[family][0]
  config = config_lib.load_module(REPO / config_file).get_config(f"tiny,checkpoint={source}")
  assert config.model.init == "pretrained" and config.model.checkpoint == str(source)
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))
  cfg, loaded = hf.load_pretrained(source)
  leaves = len(jax_leaves(loaded))
  report = (run / "graft_report.txt").read_text()
  assert f"graft: {leaves} transferred, 0 left at init, 0 unused in source" in report
  # The fine-tuned model goes back to transformers whole: no key missing or unexpected.
  from research.train import checkpoints

  best, _ = checkpoints.load_params(run)
  out = hf.save_pretrained(tmp_path / "export", cfg, best, tokenizer_from=source)
  model_cls = getattr(transformers, FAMILIES[family][1])
  _, info = model_cls.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info


def jax_leaves(tree) -> list:
  import jax

  return jax.tree_util.tree_leaves(tree)


def _opus_mt_checkpoint(directory):
  """An Opus-MT-shaped checkpoint: SentencePiece models per language trained on the fixture,
  one joint ``vocab.json``, transformers' MarianTokenizer and a random MarianMTModel."""
  import gzip

  import sentencepiece
  import torch
  import transformers

  fixture = REPO / "tests" / "fixtures" / "data" / "multi30k"
  work = directory / "spm"
  work.mkdir(parents=True)
  vocab = {"</s>": 0, "<unk>": 1}
  for lang in ("en", "de"):
    with gzip.open(fixture / f"train.{lang}.gz", "rt") as text:
      (work / f"{lang}.txt").write_text(text.read())
    sentencepiece.SentencePieceTrainer.train(
      input=str(work / f"{lang}.txt"),
      model_prefix=str(work / lang),
      vocab_size=60,
      hard_vocab_limit=False,
      character_coverage=1.0,
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      unk_id=0,
      minloglevel=2,
    )
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(work / f"{lang}.model"))
    for i in range(pieces.get_piece_size()):
      vocab.setdefault(pieces.id_to_piece(i), len(vocab))
  vocab["<pad>"] = len(vocab)
  (work / "vocab.json").write_text(json.dumps(vocab))
  tokenizer = transformers.MarianTokenizer(
    str(work / "en.model"), str(work / "de.model"), str(work / "vocab.json")
  )
  tokenizer.save_pretrained(directory)
  torch.manual_seed(0)
  pad = vocab["<pad>"]
  cfg = transformers.MarianConfig(
    vocab_size=len(vocab),
    pad_token_id=pad,
    decoder_start_token_id=pad,
    eos_token_id=0,
    **_BART_SIZES,
  )
  transformers.MarianMTModel(cfg).eval().save_pretrained(directory)
  return directory, tokenizer


def test_marian_opus_mt_sentencepiece_tokenizers_encode_targets_and_translate(tmp_path):
  """The Opus-MT layout end to end: targets through the target language's SentencePiece model
  (``text_target``), shifted behind the pad start token; training, decoding and detokenising."""
  from research.tasks import seq2seq as task
  from research.tasks import seq2seq_text as text
  from research.train.trainer import train_and_evaluate

  source, tokenizer = _opus_mt_checkpoint(tmp_path / "opus")
  config = config_lib.load_module(REPO / "configs/multi30k_marian.py").get_config(
    f"tiny,checkpoint={source}"
  )
  tokenizers = text.Tokenizers(tokenizer, tokenizer, decoder_start=tokenizer.pad_token_id)
  pair = ("A man rides a bike.", "Ein Mann fährt Fahrrad.")
  encoded = task.encode_pairs(tokenizers, [pair[0]], [pair[1]], 32, 32).ragged
  target = tokenizer(text_target=[pair[1]])["input_ids"][0]
  assert target[-1] == tokenizer.eos_token_id
  assert encoded["labels"][0].tolist() == target
  assert encoded["decoder_input_ids"][0].tolist() == [tokenizer.pad_token_id, *target[:-1]]
  assert encoded["input_ids"][0].tolist() == tokenizer([pair[0]])["input_ids"][0]
  assert tokenizers.decode(target) == pair[1]
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))
  results = json.loads((run / "results.json").read_text())
  assert results["steps"] == 10 and "bleu" in results["eval"]["multi30k"]
  assert "graft: " in (run / "graft_report.txt").read_text()

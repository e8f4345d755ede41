"""Helpers for trainer tests: tiny configs over the committed SST-2 fixture."""

import shutil
from pathlib import Path

import numpy as np

from research import config_lib, paths

REPO = Path(__file__).resolve().parents[1]


def load_config_module(name: str):
  """``configs/<name>.py`` as a module, loaded the way the CLI and the launchers load it."""
  return config_lib.load_module(REPO / "configs" / f"{name}.py")


def tiny_config(**train):
  """``configs/sst2_minilm.py:tiny`` (2-layer scratch encoder, fixture data), no dropout."""
  config = load_config_module("sst2_minilm").get_config("tiny")
  config.model.dropout = 0.0
  config.tasks.sst2.head.dropout = 0.0
  config.train.update(train)
  return config


def make_tiny_minilm_like(directory: Path) -> Path:
  """A tiny random BERT with MiniLM's vocabulary and tokenizer files, as an HF directory."""
  import torch
  import transformers

  from research.transfer import hf

  torch.manual_seed(0)
  cfg = transformers.BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
  )
  transformers.BertModel(cfg).save_pretrained(directory)
  source = hf.resolve(hf.MINILM)
  for name in hf.TOKENIZER_FILES:
    if (source / name).is_file():
      shutil.copy2(source / name, directory / name)
  return directory


def batch_digest(batch: dict) -> str:
  import hashlib

  h = hashlib.sha1()
  for key in sorted(batch):
    h.update(key.encode())
    h.update(np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()


def max_abs_diff(a, b) -> float:
  fa, fb = paths.flatten(a), paths.flatten(b)
  assert fa.keys() == fb.keys()
  return max(float(np.max(np.abs(np.asarray(fa[k], np.float64) - fb[k]))) for k in fa)

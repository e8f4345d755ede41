"""Tiny random HF checkpoints made with transformers itself (no download), for parity tests."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

COMMON = dict(
  vocab_size=99,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=37,
  max_position_embeddings=64,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def tiny_config(model_type: str):
  import transformers

  if model_type == "bert":
    return transformers.BertConfig(**COMMON)
  if model_type == "roberta":
    return transformers.RobertaConfig(**COMMON, type_vocab_size=1, pad_token_id=1)
  if model_type == "xlm-roberta":
    return transformers.XLMRobertaConfig(**COMMON, type_vocab_size=1, pad_token_id=1)
  if model_type == "electra":
    return transformers.ElectraConfig(**COMMON, embedding_size=16)
  if model_type == "distilbert":
    return transformers.DistilBertConfig(
      vocab_size=99,
      dim=32,
      n_layers=2,
      n_heads=4,
      hidden_dim=37,
      max_position_embeddings=64,
      dropout=0.0,
      attention_dropout=0.0,
    )
  raise ValueError(model_type)


def make_checkpoint(model_type: str, directory: Path, seed: int = 0) -> Path:
  """Saves a randomly initialised base model of ``model_type`` to ``directory``."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModel.from_config(tiny_config(model_type)).eval()
  model.save_pretrained(directory)
  return directory


def llama_checkpoint(
  sizes: Mapping[str, Any], tokenizer_dir: Path, directory: Path, seed: int = 0
) -> Path:
  """Saves a random ``LlamaForCausalLM`` of ``sizes`` to ``directory`` beside the tokenizer files
  of ``tokenizer_dir``: a decoder checkpoint a config can name (``checkpoint=``), model and
  tokenizer both, without a download."""
  import torch
  import transformers

  from research.transfer import hf

  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)).save_pretrained(directory)
  for name in hf.TOKENIZER_FILES:
    if (tokenizer_dir / name).is_file():
      (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
  return directory


def padded_batch(pad_id: int, vocab: int = 99) -> tuple[np.ndarray, np.ndarray]:
  """Three sequences of lengths 10, 4 and 7, padded to 10."""
  rng = np.random.default_rng(0)
  ids = np.full((3, 10), pad_id, np.int32)
  mask = np.zeros((3, 10), np.int32)
  for i, n in enumerate([10, 4, 7]):
    ids[i, :n] = rng.integers(3, vocab, n)
    mask[i, :n] = 1
  return ids, mask


def torch_hidden(directory: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  import torch
  import transformers

  model = transformers.AutoModel.from_pretrained(str(directory)).eval()
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
  return out.last_hidden_state.numpy()

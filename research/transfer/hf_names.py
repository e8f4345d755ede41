"""The map between our parameter paths and HF transformers' weight names, per family.

One table per architecture family. Our paths are those of research.models.encoder under the
``encoder/`` prefix; HF names are those of the *base* model (``BertModel``, ``RobertaModel``...),
i.e. without the ``bert.``/``roberta.`` prefix that task models add. Linear kernels are stored
transposed in PyTorch ([out, in]); :func:`to_hf` / :func:`from_hf` handle that.
"""

from __future__ import annotations

import numpy as np

from research.models.config import EncoderConfig

# Prefixes that HF task models put in front of the base model's names.
BASE_PREFIXES = ("bert.", "roberta.", "electra.", "distilbert.", "model.")
# Buffers saved by some transformers versions that are not parameters.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

_BERT_LAYER = {
  "attention/query": "attention.self.query",
  "attention/key": "attention.self.key",
  "attention/value": "attention.self.value",
  "attention/output": "attention.output.dense",
  "attention_norm": "attention.output.LayerNorm",
  "ffn/intermediate": "intermediate.dense",
  "ffn/output": "output.dense",
  "output_norm": "output.LayerNorm",
}
_DISTILBERT_LAYER = {
  "attention/query": "attention.q_lin",
  "attention/key": "attention.k_lin",
  "attention/value": "attention.v_lin",
  "attention/output": "attention.out_lin",
  "attention_norm": "sa_layer_norm",
  "ffn/intermediate": "ffn.lin1",
  "ffn/output": "ffn.lin2",
  "output_norm": "output_layer_norm",
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_NORMS = ("layer_norm", "attention_norm", "output_norm")


def module_map(cfg: EncoderConfig) -> dict[str, str]:
  """Our module path (under ``encoder/``) -> HF module name, for this architecture."""
  m = {
    "embeddings/word_embeddings": "embeddings.word_embeddings",
    "embeddings/position_embeddings": "embeddings.position_embeddings",
    "embeddings/layer_norm": "embeddings.LayerNorm",
  }
  if cfg.type_vocab_size > 0:
    m["embeddings/token_type_embeddings"] = "embeddings.token_type_embeddings"
  if cfg.embedding_size is not None:
    m["embeddings/projection"] = "embeddings_project"
  layer, stack = (
    (_DISTILBERT_LAYER, "transformer.layer")
    if cfg.family == "distilbert"
    else (_BERT_LAYER, "encoder.layer")
  )
  for i in range(cfg.num_layers):
    for ours, theirs in layer.items():
      m[f"layer_{i}/{ours}"] = f"{stack}.{i}.{theirs}"
  if cfg.use_pooler:
    m["pooler"] = "pooler.dense"
  return m


def leaf_map(cfg: EncoderConfig) -> dict[str, str]:
  """Our full leaf path (``encoder/...``) -> HF weight name."""
  out = {}
  for ours, theirs in module_map(cfg).items():
    last = ours.rsplit("/", 1)[-1]
    if last in _NORMS:
      leaves = ("scale", "bias")
    elif last.endswith("_embeddings"):
      leaves = ("embedding",)
    else:
      leaves = ("kernel", "bias")
    for leaf in leaves:
      out[f"encoder/{ours}/{leaf}"] = f"{theirs}.{_LEAF[leaf]}"
  return out


def legacy_names(hf_name: str) -> list[str]:
  """Older spellings of an HF name (TF-era checkpoints store LayerNorm gamma/beta)."""
  if ".LayerNorm." in hf_name or "layer_norm." in hf_name:
    return [hf_name.replace(".weight", ".gamma"), hf_name.replace(".bias", ".beta")]
  return []


def to_hf(path: str, value: np.ndarray) -> np.ndarray:
  """Our leaf -> HF tensor layout (kernels transposed)."""
  return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


def from_hf(path: str, value: np.ndarray) -> np.ndarray:
  """HF tensor -> our leaf layout."""
  return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


def hf_config_dict(cfg: EncoderConfig) -> dict:
  """A config.json for ``cfg``: the one it was read from, updated with our fields."""
  hf = cfg.hf_config
  hf.setdefault("model_type", cfg.model_type)
  if cfg.family == "distilbert":
    hf.update(
      vocab_size=cfg.vocab_size,
      dim=cfg.hidden_size,
      n_layers=cfg.num_layers,
      n_heads=cfg.num_heads,
      hidden_dim=cfg.intermediate_size,
      activation=cfg.hidden_act,
      max_position_embeddings=cfg.max_position_embeddings,
      dropout=cfg.hidden_dropout,
      attention_dropout=cfg.attention_dropout,
      pad_token_id=cfg.pad_token_id,
    )
    hf.setdefault("architectures", ["DistilBertModel"])
    return hf
  hf.update(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    intermediate_size=cfg.intermediate_size,
    hidden_act=cfg.hidden_act,
    max_position_embeddings=cfg.max_position_embeddings,
    type_vocab_size=cfg.type_vocab_size,
    layer_norm_eps=cfg.layer_norm_eps,
    hidden_dropout_prob=cfg.hidden_dropout,
    attention_probs_dropout_prob=cfg.attention_dropout,
    pad_token_id=cfg.pad_token_id,
  )
  if cfg.family == "electra":
    hf["embedding_size"] = cfg.embedding_size or cfg.hidden_size
  arch = {"bert": "BertModel", "roberta": "RobertaModel", "electra": "ElectraModel"}
  hf.setdefault("architectures", [arch[cfg.family]])
  return hf

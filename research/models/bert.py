"""The BERT-like family: BERT, RoBERTa / XLM-R / CamemBERT, DistilBERT, ELECTRA and MiniLM.

They are one post-LN Transformer encoder (research.models.encoder, configured by
research.models.config.EncoderConfig) that differs only in data: position numbering, token
types, an embedding projection, a pooler, the spelling of config keys and of weight names. This
module is where those sub-variants are told apart (by ``model_type``), so that nothing outside
it has to: it translates ``config.json`` to and from EncoderConfig and maps our parameter paths
to the HF names of each base model (``BertModel``, ``RobertaModel``, ``DistilBertModel``,
``ElectraModel``). MiniLM checkpoints are ``model_type`` ``bert``.

HF names are those of the *base* model, without the ``bert.``/``roberta.`` prefix task models
add (research.transfer.hf strips it). Linear kernels are transposed there ([out, in]).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from research.models.config import HF_CONFIG_KEYS, EncoderConfig, hf_getter
from research.models.encoder import Encoder
from research.models.family import ENCODER_SHARDING, Family, leaf_names


@dataclasses.dataclass(frozen=True)
class Variant:
  """How one sub-variant spells and lays out the shared architecture."""

  layer: Mapping[str, str]  # our module path inside a layer -> HF module name
  stack: str  # the HF name of the layer list
  architecture: str  # ``architectures`` written into an exported config.json
  pooler: bool  # whether the base model has a pooler
  position_from_pad: bool  # RoBERTa: positions count from pad_token_id + 1, skipping padding


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
_BERT = Variant(_BERT_LAYER, "encoder.layer", "BertModel", pooler=True, position_from_pad=False)
_ROBERTA = Variant(
  _BERT_LAYER, "encoder.layer", "RobertaModel", pooler=True, position_from_pad=True
)
_ELECTRA = Variant(
  _BERT_LAYER, "encoder.layer", "ElectraModel", pooler=False, position_from_pad=False
)
_DISTILBERT = Variant(
  _DISTILBERT_LAYER, "transformer.layer", "DistilBertModel", pooler=False, position_from_pad=False
)
# model_type (config.json) -> sub-variant.
VARIANTS: dict[str, Variant] = {
  "bert": _BERT,
  "roberta": _ROBERTA,
  "xlm-roberta": _ROBERTA,
  "camembert": _ROBERTA,
  "distilbert": _DISTILBERT,
  "electra": _ELECTRA,
}
# Prefixes that HF task models put in front of the base model's names.
BASE_PREFIXES = ("bert.", "roberta.", "electra.", "distilbert.", "model.")
# Buffers saved by some transformers versions that are not parameters.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> EncoderConfig:
  """EncoderConfig from a parsed HF ``config.json`` of one of :data:`VARIANTS`.

  Raises:
    ValueError: another model_type or a missing key, naming ``source``.
  """
  model_type = hf.get("model_type")
  if model_type not in VARIANTS:
    raise ValueError(f"{source}: model_type {model_type!r} is not one of {sorted(VARIANTS)}")
  variant, get = VARIANTS[model_type], hf_getter(hf, source)
  blob = json.dumps(dict(hf), sort_keys=True)
  if variant is _DISTILBERT:
    return EncoderConfig(
      model_type=model_type,
      vocab_size=get("vocab_size"),
      hidden_size=get("dim"),
      num_layers=get("n_layers"),
      num_heads=get("n_heads"),
      intermediate_size=get("hidden_dim"),
      hidden_act=get("activation", "gelu"),
      max_position_embeddings=get("max_position_embeddings"),
      type_vocab_size=0,
      layer_norm_eps=1e-12,
      hidden_dropout=get("dropout", 0.1),
      attention_dropout=get("attention_dropout", 0.1),
      pad_token_id=get("pad_token_id", 0),
      use_pooler=False,
      hf_config_json=blob,
    )
  embedding_size = hf.get("embedding_size") if variant is _ELECTRA else None
  pad = get("pad_token_id", 1 if variant.position_from_pad else 0)
  return EncoderConfig(
    model_type=model_type,
    vocab_size=get("vocab_size"),
    hidden_size=get("hidden_size"),
    num_layers=get("num_hidden_layers"),
    num_heads=get("num_attention_heads"),
    intermediate_size=get("intermediate_size"),
    hidden_act=get("hidden_act", "gelu"),
    max_position_embeddings=get("max_position_embeddings"),
    type_vocab_size=get("type_vocab_size", 2),
    layer_norm_eps=get("layer_norm_eps", 1e-12),
    hidden_dropout=get("hidden_dropout_prob", 0.1),
    attention_dropout=get("attention_probs_dropout_prob", 0.1),
    pad_token_id=pad,
    position_offset=pad + 1 if variant.position_from_pad else 0,
    embedding_size=embedding_size if embedding_size != get("hidden_size") else None,
    use_pooler=variant.pooler,
    hf_config_json=blob,
  )


# Our EncoderConfig field -> its config.json key in DistilBERT's layout (BERT's: HF_CONFIG_KEYS).
_DISTILBERT_KEYS = {
  "vocab_size": "vocab_size",
  "hidden_size": "dim",
  "num_layers": "n_layers",
  "num_heads": "n_heads",
  "intermediate_size": "hidden_dim",
  "hidden_act": "activation",
  "max_position_embeddings": "max_position_embeddings",
  "hidden_dropout": "dropout",
  "attention_dropout": "attention_dropout",
  "pad_token_id": "pad_token_id",
}


def config_to_hf(cfg: EncoderConfig) -> dict[str, Any]:
  """A config.json for ``cfg``: the one it was read from, updated with our fields."""
  hf = cfg.hf_config
  hf.setdefault("model_type", cfg.model_type)
  variant = VARIANTS[cfg.model_type]
  keys = _DISTILBERT_KEYS if variant is _DISTILBERT else HF_CONFIG_KEYS
  hf.update({theirs: getattr(cfg, ours) for ours, theirs in keys.items()})
  if variant is _ELECTRA:
    hf["embedding_size"] = cfg.embedding_size or cfg.hidden_size
  hf.setdefault("architectures", [variant.architecture])
  return hf


def module_map(cfg: EncoderConfig) -> dict[str, str]:
  """Our module path (under ``encoder/``) -> HF module name, for this sub-variant."""
  m = {
    "embeddings/word_embeddings": "embeddings.word_embeddings",
    "embeddings/position_embeddings": "embeddings.position_embeddings",
    "embeddings/layer_norm": "embeddings.LayerNorm",
  }
  if cfg.type_vocab_size > 0:
    m["embeddings/token_type_embeddings"] = "embeddings.token_type_embeddings"
  if cfg.embedding_size is not None:
    m["embeddings/projection"] = "embeddings_project"
  variant = VARIANTS[cfg.model_type]
  for i in range(cfg.num_layers):
    for ours, theirs in variant.layer.items():
      m[f"layer_{i}/{ours}"] = f"{variant.stack}.{i}.{theirs}"
  if cfg.use_pooler:
    m["pooler"] = "pooler.dense"
  return m


def leaf_map(cfg: EncoderConfig) -> dict[str, str]:
  """Our full leaf path (``encoder/...``) -> HF weight name."""
  return leaf_names(module_map(cfg))


def legacy_names(hf_name: str) -> list[str]:
  """Older spellings of an HF name (TF-era checkpoints store LayerNorm gamma/beta)."""
  if ".LayerNorm." in hf_name or "layer_norm." in hf_name:
    return [hf_name.replace(".weight", ".gamma"), hf_name.replace(".bias", ".beta")]
  return []


FAMILY = Family(
  name="bert",
  config_type=EncoderConfig,
  encoder=Encoder,
  model_types=tuple(VARIANTS),
  from_hf=config_from_hf,
  to_hf=config_to_hf,
  weight_names=leaf_map,
  legacy_names=legacy_names,
  base_prefixes=BASE_PREFIXES,
  buffers=BUFFERS,
  sharding_rules=ENCODER_SHARDING,
  tiny=EncoderConfig.tiny,
)

"""EncoderConfig: one architecture description for the BERT family, built from HF config.json.

BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA and MiniLM are the same post-LN Transformer encoder
with small differences (position offset, token types, embedding projection, pooler, names of
config keys). They are captured here as plain fields so one Flax implementation covers them all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from research.transfer.peft import PeftConfig

# model_type -> family. The family decides the HF weight names and a few architectural details.
FAMILIES = {
  "bert": "bert",
  "roberta": "roberta",
  "xlm-roberta": "roberta",
  "camembert": "roberta",
  "distilbert": "distilbert",
  "electra": "electra",
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT-family encoder (hashable, so it can sit inside a linen Module)."""

  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2  # 0: no token-type embedding (DistilBERT).
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  # RoBERTa numbers positions from pad_token_id + 1 and skips padding; BERT counts from 0.
  position_offset: int = 0
  # ELECTRA: embeddings are narrower than the hidden states and projected up.
  embedding_size: int | None = None
  use_pooler: bool = True
  # The original config.json, kept verbatim so export writes back what was read.
  hf_config_json: str = "{}"
  # Parameter-efficient transfer (LoRA, adapters): extra params; None for the plain encoder.
  peft: PeftConfig | None = None

  @property
  def family(self) -> str:
    return FAMILIES[self.model_type]

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **kwargs: Any) -> EncoderConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> EncoderConfig:
    """Builds the config from a parsed HF ``config.json``.

    Args:
      hf: the parsed JSON.
      source: file name used in error messages.

    Raises:
      ValueError: unknown ``model_type`` or a missing key, naming ``source``.
    """
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
      raise ValueError(
        f"{source}: unknown model_type {model_type!r}; supported: {sorted(FAMILIES)}"
      )
    family = FAMILIES[model_type]

    def get(key: str, default: Any = dataclasses.MISSING) -> Any:
      if key in hf:
        return hf[key]
      if default is dataclasses.MISSING:
        raise ValueError(f"{source}: missing key {key!r} for model_type {model_type!r}")
      return default

    blob = json.dumps(dict(hf), sort_keys=True)
    if family == "distilbert":
      return cls(
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
    embedding_size = hf.get("embedding_size") if family == "electra" else None
    pad = get("pad_token_id", 1 if family == "roberta" else 0)
    return cls(
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
      position_offset=pad + 1 if family == "roberta" else 0,
      embedding_size=embedding_size if embedding_size != get("hidden_size") else None,
      use_pooler=family in ("bert", "roberta"),
      hf_config_json=blob,
    )

  @classmethod
  def tiny(cls, **kwargs: Any) -> EncoderConfig:
    """A 2-layer, 32-wide BERT for tests and smoke runs."""
    base = dict(
      vocab_size=128,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      intermediate_size=64,
      max_position_embeddings=64,
    )
    base.update(kwargs)
    return cls(**base)

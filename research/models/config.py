"""EncoderConfig: one architecture description for the BERT family, built from HF config.json.

BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA and MiniLM are the same post-LN Transformer encoder
with small differences (position offset, token types, embedding projection, pooler, names of
config keys). They are captured here as plain fields so one Flax implementation covers them all.

PeftConfig (LoRA, adapters, BitFit) lives here too: it is part of the architecture (it decides
which extra parameters the encoder creates), so the models layer owns it, and
research.transfer.peft builds the optimizer rules and LoRA merging on top of it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from research import paths

# model_type -> family. The family decides the HF weight names and a few architectural details.
FAMILIES = {
  "bert": "bert",
  "roberta": "roberta",
  "xlm-roberta": "roberta",
  "camembert": "roberta",
  "distilbert": "distilbert",
  "electra": "electra",
}

PEFT_METHODS = ("none", "lora", "adapters", "bitfit")
PEFT_PLACEMENTS = ("houlsby", "pfeiffer")
# The adapter submodules of each encoder layer, by placement.
ADAPTER_MODULES = {"houlsby": ("attention_adapter", "ffn_adapter"), "pfeiffer": ("ffn_adapter",)}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Which parameter-efficient method to use and its sizes (hashable: sits in EncoderConfig).

  Attributes:
    method: 'none' | 'lora' | 'adapters' | 'bitfit'.
    lora_rank / lora_alpha: the update is ``A B * alpha / rank`` with A [in, rank].
    lora_dropout: dropout on the LoRA branch's input (one mask shared by the fused q/k/v).
    lora_targets: regexes over module paths such as ``encoder/layer_3/attention/query``.
    adapter_size: bottleneck width of each adapter.
    adapter_placement: 'houlsby' (after attention and FFN) or 'pfeiffer' (after FFN only).
  """

  method: str = "none"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = (r"encoder/layer_\d+/attention/(query|value)",)
  adapter_size: int = 64
  adapter_placement: str = "houlsby"

  def __post_init__(self):
    if self.method not in PEFT_METHODS:
      raise ValueError(f"model.peft.method={self.method!r}: expected one of {PEFT_METHODS}")
    if self.adapter_placement not in PEFT_PLACEMENTS:
      raise ValueError(
        f"model.peft.adapter_placement={self.adapter_placement!r}: "
        f"expected one of {PEFT_PLACEMENTS}"
      )
    if self.lora_rank < 1 or self.adapter_size < 1:
      raise ValueError("model.peft: lora_rank and adapter_size must be positive")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"model.peft.lora_dropout={self.lora_dropout}: expected [0, 1)")
    if isinstance(self.lora_targets, str):
      raise TypeError("model.peft.lora_targets: a tuple of regexes, not one string")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    paths.compile_rules([(t, None) for t in self.lora_targets])  # Names a malformed regex.

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def is_lora_target(self, module_path: str) -> bool:
    """Whether the projection at ``module_path`` gets LoRA matrices (only for method 'lora')."""
    return self.method == "lora" and paths.match(
      [(t, True) for t in self.lora_targets], module_path, False
    )

  @property
  def adapter_modules(self) -> tuple[str, ...]:
    """Names of the adapter submodules of each encoder layer (none unless method 'adapters')."""
    return ADAPTER_MODULES[self.adapter_placement] if self.method == "adapters" else ()


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

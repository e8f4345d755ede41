"""EncoderConfig: one architecture description for the BERT-like encoders.

BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA and MiniLM are the same post-LN Transformer encoder
with small differences (position offset, token types, embedding projection, pooler). They are
captured here as plain fields so one Flax implementation covers them all; which sub-variant sets
which field, and how config.json spells it, is research.models.bert's business (the family
module), so this module knows no model type by name.

PeftConfig (LoRA, adapters, BitFit) lives here too: it is part of the architecture (it decides
which extra parameters the encoder creates), so the models layer owns it, and
research.transfer.peft builds the optimizer rules and LoRA merging on top of it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from research import paths

PEFT_METHODS = ("none", "lora", "adapters", "bitfit")
PEFT_PLACEMENTS = ("houlsby", "pfeiffer")
PEFT_QUANTIZE = ("none", "nf4")  # Storage of the frozen base under LoRA (nf4: QLoRA).
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
    use_dora: LoRA as DoRA (Liu et al. 2024): a trained magnitude per output column times the
      column-normalised ``W + A B * alpha / rank`` (peft's ``use_dora``).
    quantize: 'nf4' stores the frozen base projections in 4-bit NormalFloat with
      double-quantised scales (QLoRA, Dettmers et al. 2023); LoRA only.
  """

  method: str = "none"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = (r"encoder/layer_\d+/attention/(query|value)",)
  adapter_size: int = 64
  adapter_placement: str = "houlsby"
  use_dora: bool = False
  quantize: str = "none"

  def __post_init__(self):
    if self.quantize not in PEFT_QUANTIZE:
      raise ValueError(f"model.peft.quantize={self.quantize!r}: expected one of {PEFT_QUANTIZE}")
    if (self.use_dora or self.quantize != "none") and self.method != "lora":
      raise ValueError(
        f"model.peft.use_dora / quantize build on LoRA; method={self.method!r} (set 'lora')"
      )
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


# Our config field -> its key in the config.json of BERT and the families that copied its names
# (RoBERTa, ELECTRA, MPNet, ...).
HF_CONFIG_KEYS = {
  "vocab_size": "vocab_size",
  "hidden_size": "hidden_size",
  "num_layers": "num_hidden_layers",
  "num_heads": "num_attention_heads",
  "intermediate_size": "intermediate_size",
  "hidden_act": "hidden_act",
  "max_position_embeddings": "max_position_embeddings",
  "type_vocab_size": "type_vocab_size",
  "layer_norm_eps": "layer_norm_eps",
  "hidden_dropout": "hidden_dropout_prob",
  "attention_dropout": "attention_probs_dropout_prob",
  "pad_token_id": "pad_token_id",
}


def hf_getter(hf: Mapping[str, Any], source: str) -> Callable[..., Any]:
  """``get(key, default)`` over a parsed config.json: a key that is missing and has no default
  raises, naming ``source`` and the model type."""

  def get(key: str, default: Any = dataclasses.MISSING) -> Any:
    if key in hf:
      return hf[key]
    if default is dataclasses.MISSING:
      raise ValueError(f"{source}: missing key {key!r} for model_type {hf.get('model_type')!r}")
    return default

  return get


# The sizes of every family's ``tiny()`` config (tests and smoke runs of the whole stack).
TINY_SIZES = dict(
  vocab_size=128,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=64,
  max_position_embeddings=64,
)


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
  # 0: positions count 0, 1, 2... (BERT). Else the first real token's position: tokens equal to
  # position_offset - 1 are padding and keep that position (RoBERTa: pad_token_id + 1).
  position_offset: int = 0
  # ELECTRA: embeddings are narrower than the hidden states and projected up.
  embedding_size: int | None = None
  use_pooler: bool = True
  # The original config.json, kept verbatim so export writes back what was read.
  hf_config_json: str = "{}"
  # Parameter-efficient transfer (LoRA, adapters): extra params; None for the plain encoder.
  peft: PeftConfig | None = None

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **kwargs: Any) -> EncoderConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def tiny(cls, **kwargs: Any) -> EncoderConfig:
    """A 2-layer, 32-wide BERT for tests and smoke runs."""
    return cls(**{**TINY_SIZES, **kwargs})

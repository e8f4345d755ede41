"""MPNet: the second Transformer family, on the shared encoder with a relative position bias.

MPNet (Song et al., 2020; all-mpnet-base-v2 is the strongest common sentence encoder) is the
encoder of research.models.encoder with three differences, and this module holds only those:

- embeddings are word + position only (no token types); positions count from ``PADDING_IDX + 1``
  and skip padding, as in RoBERTa (MPNetConfig answers ``type_vocab_size=0`` and
  ``position_offset=2``, so the shared Embeddings module builds them);
- every layer adds the same *relative position bias* to its attention logits: one learned
  ``[num_buckets, num_heads]`` table (``encoder/relative_attention_bias/embedding``, beside the
  layers) indexed by T5-style log-bucketed key-minus-query offsets (:meth:`MPNetEncoder.
  position_bias`, the one hook the shared Encoder leaves for it);
- config.json keys and HF weight names (``attention.attn.q``, ``attention.LayerNorm``, ...).

Everything else (layers, fused q/k/v, FFN, pooler, LoRA and adapters through ``config.peft``,
remat, ``first_token_only``) is the shared encoder's, with its parameter paths
(``layer_3/attention/query/kernel``...), so graft, freeze and LoRA rules written for BERT apply
unchanged. Loading, export and ``verify`` are research.transfer.hf's generic ones, through
:data:`FAMILY`.

Parity with transformers is exact up to fp32 rounding: two HF details are mirrored on purpose
rather than "fixed": positions use padding index 1 whatever ``pad_token_id`` says, and the
bucketing always uses 32 buckets (HF's ``compute_position_bias`` default) even when the config's
``relative_attention_num_buckets`` (the table size) is larger.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models.common import dense_init
from research.models.config import HF_CONFIG_KEYS, TINY_SIZES, hf_getter
from research.models.encoder import Encoder
from research.models.family import ENCODER_SHARDING, HEADS, Family, leaf_names

Array = jax.Array

PADDING_IDX = 1  # HF's MPNetEmbeddings hard-codes it for position ids.
BUCKETS = 32  # HF's compute_position_bias never passes the config's bucket count.
MAX_DISTANCE = 128
BASE_PREFIXES = ("mpnet.",)  # What MPNetFor* task models put in front of the base model's names.
BUFFERS = ("embeddings.position_ids",)  # Saved by old transformers; not a parameter.


# The BERT-style config.json keys MPNet's has (no token types).
MPNET_KEYS = frozenset(HF_CONFIG_KEYS.values()) - {"type_vocab_size"}


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
  """Architecture of an MPNet encoder (hashable, so it can sit inside a linen Module).

  Field names follow EncoderConfig, and the properties below answer the questions the shared
  encoder asks of an EncoderConfig, so research.models.encoder's modules read it unchanged.
  """

  model_type: str = "mpnet"
  vocab_size: int = 30527
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 514
  layer_norm_eps: float = 1e-5
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 1
  relative_attention_num_buckets: int = 32
  use_pooler: bool = True
  # The original config.json, kept verbatim so export writes back what was read.
  hf_config_json: str = "{}"
  # Parameter-efficient transfer (research.transfer.peft); None for the plain encoder.
  peft: Any = None

  def __post_init__(self):
    if self.relative_attention_num_buckets < BUCKETS:
      raise ValueError(
        f"relative_attention_num_buckets={self.relative_attention_num_buckets}: MPNet (as HF "
        f"implements it) indexes {BUCKETS} buckets, the table needs at least that many rows"
      )

  @property
  def type_vocab_size(self) -> int:
    return 0  # No token-type embeddings (lets code written for EncoderConfig ask).

  @property
  def embedding_size(self) -> None:
    return None  # Embeddings are as wide as the hidden states (no ELECTRA-style projection).

  @property
  def position_offset(self) -> int:
    return PADDING_IDX + 1  # RoBERTa-style positions with HF's hard-coded padding index.

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kwargs: Any) -> MPNetConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> MPNetConfig:
    """Builds the config from a parsed HF ``config.json`` of ``model_type`` ``mpnet``.

    Raises:
      ValueError: another ``model_type`` or a missing key, naming ``source``.
    """
    if hf.get("model_type") != "mpnet":
      raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'mpnet'")

    get = hf_getter(hf, source)

    return cls(
      vocab_size=get("vocab_size"),
      hidden_size=get("hidden_size"),
      num_layers=get("num_hidden_layers"),
      num_heads=get("num_attention_heads"),
      intermediate_size=get("intermediate_size"),
      hidden_act=get("hidden_act", "gelu"),
      max_position_embeddings=get("max_position_embeddings"),
      layer_norm_eps=get("layer_norm_eps", 1e-12),  # transformers' MPNetConfig default.
      hidden_dropout=get("hidden_dropout_prob", 0.1),
      attention_dropout=get("attention_probs_dropout_prob", 0.1),
      pad_token_id=get("pad_token_id", 1),
      relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
      hf_config_json=json.dumps(dict(hf), sort_keys=True),
    )

  def to_hf(self) -> dict[str, Any]:
    """A config.json: the one this was read from, updated with our fields."""
    hf = self.hf_config
    hf.update({k: getattr(self, ours) for ours, k in HF_CONFIG_KEYS.items() if k in MPNET_KEYS})
    hf.update(
      model_type="mpnet", relative_attention_num_buckets=self.relative_attention_num_buckets
    )
    hf.setdefault("architectures", ["MPNetModel"])
    return hf

  @classmethod
  def tiny(cls, **kwargs: Any) -> MPNetConfig:
    """A 2-layer, 32-wide MPNet for tests and smoke runs."""
    return cls(**{**TINY_SIZES, **kwargs})


def relative_position_bucket(relative_position: np.ndarray) -> np.ndarray:
  """HF's (T5-style, bidirectional) bucket of each ``key - query`` offset, in numpy.

  Half the buckets per direction; offsets below 8 get their own bucket, larger ones share
  log-spaced buckets up to ``MAX_DISTANCE``. Computed in float32 like transformers, so bucket
  edges fall exactly where theirs do. Shapes are static, so this runs once per trace.
  """
  n = -np.asarray(relative_position, np.int64)
  half = BUCKETS // 2
  ret = (n < 0).astype(np.int64) * half
  n = np.abs(n)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) at offset 0, which the exact branch keeps.
    scaled = (
      np.log(n.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(MAX_DISTANCE / max_exact))
      * np.float32(half - max_exact)
    )
  large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
  return ret + np.where(n < max_exact, n, np.minimum(large, half - 1))


class MPNetEncoder(Encoder):
  """MPNet: the shared Encoder (same interface and paths) plus the relative position bias.

  Returns ``{'hidden_states': [B,T,D], 'pooled': [B,D] | None}``; ``token_type_ids`` is
  accepted for the interface and ignored (MPNet has none: ``type_vocab_size`` is 0).
  """

  config: MPNetConfig

  @nn.nowrap
  def position_bias(self, length: int) -> Array:
    """One bias [N, T, T] for all layers, from positions alone (HF ignores padding here too)."""
    cfg = self.config
    steps = np.arange(length)
    buckets = relative_position_bucket(steps[None, :] - steps[:, None])
    table = nn.Embed(
      cfg.relative_attention_num_buckets,
      cfg.num_heads,
      embedding_init=dense_init(),
      dtype=jnp.float32,  # The bias joins the fp32 logits.
      param_dtype=self.param_dtype,
      name="relative_attention_bias",
    )
    return jnp.transpose(table(buckets), (2, 0, 1))


# --- HF names ------------------------------------------------------------------------------------

_LAYER = {
  "attention/query": "attention.attn.q",
  "attention/key": "attention.attn.k",
  "attention/value": "attention.attn.v",
  "attention/output": "attention.attn.o",
  "attention_norm": "attention.LayerNorm",
  "ffn/intermediate": "intermediate.dense",
  "ffn/output": "output.dense",
  "output_norm": "output.LayerNorm",
}


def leaf_map(cfg: MPNetConfig) -> dict[str, str]:
  """Our full leaf path (``encoder/...``) -> the HF ``MPNetModel`` weight name."""
  modules = {
    "embeddings/word_embeddings": "embeddings.word_embeddings",
    "embeddings/position_embeddings": "embeddings.position_embeddings",
    "embeddings/layer_norm": "embeddings.LayerNorm",
    "relative_attention_bias": "encoder.relative_attention_bias",
  }
  for i in range(cfg.num_layers):
    for ours, theirs in _LAYER.items():
      modules[f"layer_{i}/{ours}"] = f"encoder.layer.{i}.{theirs}"
  if cfg.use_pooler:
    modules["pooler"] = "pooler.dense"
  return leaf_names(modules)


# The shared Encoder's rules, plus the relative position bias table [buckets, heads] split over
# heads like the attention logits it is added to.
SHARDING = ((".*relative_attention_bias/embedding", ("fsdp", HEADS)), *ENCODER_SHARDING)

FAMILY = Family(
  name="mpnet",
  config_type=MPNetConfig,
  encoder=MPNetEncoder,
  model_types=("mpnet",),
  from_hf=MPNetConfig.from_hf,
  to_hf=MPNetConfig.to_hf,
  weight_names=leaf_map,
  base_prefixes=BASE_PREFIXES,
  buffers=BUFFERS,
  sharding_rules=SHARDING,
  tiny=MPNetConfig.tiny,
)

"""Task heads that sit on top of an encoder: sequence classification, tagging, regression.

Each head reads the encoder's output dict (``hidden_states``, ``pooled``) and the attention
mask, and returns fp32 logits. A head is described by a small hashable HeadConfig so a
TaskModel can hold a dict of them; its parameters live at ``heads/<task name>/...``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.common import dense_init

Array = jax.Array
KINDS = ("classification", "tagging", "regression")
POOLINGS = ("pooler", "cls", "mean")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """What a head predicts.

  Attributes:
    kind: 'classification' (one label per sequence), 'tagging' (one per token), 'regression'.
    num_labels: output width (1 for regression).
    pooling: sequence summary for classification/regression: the encoder's tanh 'pooler',
      the 'cls' token's hidden state, or the 'mean' over non-padded tokens.
    dropout: dropout before the output layer.
    crf: tagging only: a linear-chain CRF over word positions (research.tasks.crf); the head
      then returns its emissions together with the transition scores.
  """

  kind: str = "classification"
  num_labels: int = 2
  pooling: str = "pooler"
  dropout: float = 0.1
  crf: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"head kind {self.kind!r} is not one of {KINDS}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"head pooling {self.pooling!r} is not one of {POOLINGS}")
    if self.crf and self.kind != "tagging":
      raise ValueError(f"head crf=True needs kind='tagging', not {self.kind!r}")
    if self.num_labels < 1:
      raise ValueError(f"head num_labels must be >= 1, got {self.num_labels}")


def pool(features: dict[str, Array | None], mask: Array, pooling: str) -> Array:
  """One vector per sequence from the encoder outputs."""
  hidden = features["hidden_states"]
  if pooling == "pooler":
    if features.get("pooled") is None:
      raise ValueError("pooling='pooler' needs an encoder with a pooler; use 'cls' or 'mean'")
    return features["pooled"]
  if pooling == "cls":
    return hidden[:, 0]
  m = mask[..., None].astype(hidden.dtype)
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


class Head(nn.Module):
  """Dropout then a linear output layer, per sequence or per token."""

  config: HeadConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, features: dict[str, Array | None], mask: Array, deterministic: bool = True
  ) -> Array | dict[str, Array]:
    cfg = self.config
    if cfg.kind == "tagging":
      x = features["hidden_states"]
    else:
      x = pool(features, mask, cfg.pooling)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    width = 1 if cfg.kind == "regression" else cfg.num_labels
    logits = nn.Dense(
      width,
      kernel_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="output",
    )(x).astype(jnp.float32)
    if cfg.kind == "regression":
      return logits[..., 0]
    if cfg.crf:
      k = cfg.num_labels
      zeros = nn.initializers.zeros
      return {
        "emissions": logits,
        "transitions": self.param("crf_transitions", zeros, (k, k), jnp.float32),
        "start": self.param("crf_start", zeros, (k,), jnp.float32),
        "end": self.param("crf_end", zeros, (k,), jnp.float32),
      }
    return logits

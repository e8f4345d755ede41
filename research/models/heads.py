"""Head building blocks that sit on top of an encoder, and the spec a TaskModel holds per task.

Which head a task gets is its task kind's choice (``research.tasks``, a layer above this one):
the kind hands the model a :class:`HeadSpec`, a small hashable object that makes the Flax
module and says whether it reads only the first position. :class:`HeadConfig` / :class:`Head`
is the stock linear head in three layouts (one vector per sequence, one number per sequence,
one vector per token, optionally with CRF transition scores). A head reads the encoder's
output dict (``hidden_states``, ``pooled``) and the attention mask and returns fp32 outputs;
its parameters live at ``heads/<task name>/...``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.common import dense_init

Array = jax.Array
LAYOUTS = ("sequence", "scalar", "token")
POOLINGS = ("pooler", "cls", "mean", "last")
# Earlier spelling of the layouts (the kind names that used them), still accepted.
_LEGACY_LAYOUTS = {"classification": "sequence", "regression": "scalar", "tagging": "token"}


class HeadSpec(Protocol):
  """What a TaskModel needs of a task's head (hashable: it is a Flax module attribute)."""

  @property
  def first_token_only(self) -> bool:
    """Whether the head reads only position 0 (then the encoder's last layer computes it alone)."""

  def module(self, dtype: Any, param_dtype: Any, **kwargs: Any) -> nn.Module:
    """The Flax head; ``kwargs`` are Flax's ``name`` / ``parent``. Called inside the model."""


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The stock linear head (a :class:`HeadSpec`).

  Attributes:
    layout: 'sequence' (pool, then ``num_labels`` outputs per sequence), 'scalar' (pool, then
      one number per sequence) or 'token' (``num_labels`` outputs per token).
    num_labels: output width ('scalar': 1).
    pooling: sequence summary for 'sequence' / 'scalar': the encoder's tanh 'pooler', the
      'cls' token's hidden state, the 'mean' over non-padded tokens, or the 'last' non-padded
      token's hidden state (what a causal decoder has seen the whole text at; either padding
      side, as transformers' *ForSequenceClassification picks it).
    dropout: dropout before the output layer.
    crf: 'token' only: a linear-chain CRF over word positions (research.tasks.crf); the head
      then returns its emissions together with the transition scores.
  """

  layout: str = "sequence"
  num_labels: int = 2
  pooling: str = "pooler"
  dropout: float = 0.1
  crf: bool = False

  def __post_init__(self):
    object.__setattr__(self, "layout", _LEGACY_LAYOUTS.get(self.layout, self.layout))
    if self.layout not in LAYOUTS:
      raise ValueError(f"head layout {self.layout!r} is not one of {LAYOUTS}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"head pooling {self.pooling!r} is not one of {POOLINGS}")
    if self.crf and self.layout != "token":
      raise ValueError(f"head crf=True needs layout='token', not {self.layout!r}")
    if self.num_labels < 1:
      raise ValueError(f"head num_labels must be >= 1, got {self.num_labels}")

  @property
  def first_token_only(self) -> bool:
    return self.layout != "token" and self.pooling in ("pooler", "cls")

  def module(self, dtype: Any, param_dtype: Any, **kwargs: Any) -> Head:
    return Head(self, dtype, param_dtype, **kwargs)


def pool_segments(hidden: Array, segments: Array, pooling: str) -> Array:
  """One vector per example of packed rows: [B, K, D] from hidden states [B, T, D] and the
  one-hot segments [B, K, T] (``segments[b, k, t]``: token t belongs to example k of row b).

  'cls' takes each example's first token, 'last' its last, 'mean' the mean over its tokens,
  exactly what :func:`pool` gives the example alone. An empty slot gets position 0 ('cls',
  'last') or zeros ('mean'); its loss weight is 0.
  """
  if pooling == "pooler":
    raise ValueError(
      "data_cfg.packing needs a head pooling of 'cls', 'mean' or 'last': the encoder's pooler "
      "reads position 0 of a row only"
    )
  if pooling in ("cls", "last"):
    steps = jnp.arange(hidden.shape[1], dtype=jnp.int32)
    if pooling == "cls":  # The smallest index in the segment: argmax finds the first True.
      index = jnp.argmax(segments.astype(jnp.int32), axis=-1)
    else:
      index = jnp.argmax(steps * segments, axis=-1)
    return jnp.take_along_axis(hidden, index[..., None], axis=1)
  m = segments.astype(hidden.dtype)
  total = jnp.einsum("bkt,btd->bkd", m, hidden)
  return total / jnp.maximum(jnp.sum(m, axis=-1), 1)[..., None]


def pool(features: dict[str, Array | None], mask: Array, pooling: str) -> Array:
  """One vector per sequence from the encoder outputs; per example ([B, K, D]) when
  ``features`` holds a packed batch's one-hot ``segments`` [B, K, T] (research.data.packing)."""
  hidden = features["hidden_states"]
  if features.get("segments") is not None:
    return pool_segments(hidden, features["segments"], pooling)
  if pooling == "pooler":
    if features.get("pooled") is None:
      raise ValueError(
        "pooling='pooler' needs an encoder with a pooler; use 'cls', 'mean' or 'last'"
      )
    return features["pooled"]
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "last":  # The largest unmasked index, as transformers: argmax(index * mask).
    steps = jnp.arange(hidden.shape[1], dtype=jnp.int32)
    last = jnp.argmax(steps * (mask > 0), axis=-1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
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
    if cfg.crf and features.get("segments") is not None:
      raise ValueError("data_cfg.packing does not support CRF heads (transitions cross rows)")
    if cfg.layout == "token":
      x = features["hidden_states"]
    else:
      x = pool(features, mask, cfg.pooling)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    width = 1 if cfg.layout == "scalar" else cfg.num_labels
    logits = nn.Dense(
      width,
      kernel_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="output",
    )(x).astype(jnp.float32)
    if cfg.layout == "scalar":
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

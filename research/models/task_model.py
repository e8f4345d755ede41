"""TaskModel: one encoder and a dict of named heads, params ``{'encoder', 'heads': {task: ...}}``.

This is the tree that grafting, freezing and meta-learning address by path. ``tasks`` picks the
heads to run (all of them by default, which is what ``init`` needs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import families
from research.models.heads import HeadSpec

Array = jax.Array


class Heads(nn.Module):
  """The named heads; a separate module so their params sit under ``heads/<name>``."""

  configs: tuple[tuple[str, HeadSpec], ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, mask, tasks: Sequence[str], deterministic: bool):
    configs = dict(self.configs)
    unknown = [t for t in tasks if t not in configs]
    if unknown:
      raise KeyError(f"unknown task(s) {unknown}; this model has heads {sorted(configs)}")
    return {
      t: configs[t].module(self.dtype, self.param_dtype, name=t)(features, mask, deterministic)
      for t in tasks
    }


class TaskModel(nn.Module):
  """An encoder shared by task heads.

  The encoder is the module of ``encoder``'s model family (research.models.families): a BERT
  encoder for an EncoderConfig, MPNet for an MPNetConfig, the CNN for a CnnConfig.

  Attributes:
    encoder: the encoder architecture (any registered family's config).
    heads: ``((task name, HeadSpec), ...)``, the heads the tasks' kinds chose (e.g. a
      :class:`~research.models.heads.HeadConfig`); :func:`make_task_model` takes a dict.
    dtype / param_dtype: compute and storage dtypes.
    remat: rematerialise encoder layers in the backward pass.
  """

  encoder: Any
  heads: tuple[tuple[str, HeadSpec], ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @property
  def task_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.heads)

  @nn.nowrap
  def encoder_module(self) -> nn.Module:
    """The encoder as :meth:`__call__` builds it, unbound: apply it to ``params['encoder']``.

    For callers that run the encoder and one head separately (research.meta runs the encoder
    once per episode outside an inner loop over the head), so they need not know how this
    model sets the encoder's dtypes and remat.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    encoder_cls = families.family_of(self.encoder).encoder
    return encoder_cls(self.encoder, remat=self.remat, parent=None, **kw)

  @nn.nowrap
  def head_module(self, task: str) -> nn.Module:
    """``task``'s head as :meth:`__call__` builds it, unbound: apply to ``params['heads'][task]``.

    Raises:
      KeyError: ``task`` has no head in this model.
    """
    configs = dict(self.heads)
    if task not in configs:
      raise KeyError(f"unknown task {task!r}; this model has heads {sorted(configs)}")
    return configs[task].module(self.dtype, self.param_dtype, parent=None)

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    tasks: Sequence[str] | None = None,
    deterministic: bool = True,
    segment_ids: Array | None = None,
    position_ids: Array | None = None,
    num_segments: int = 0,
  ) -> dict[str, Array]:
    """Returns ``{task: logits}`` for ``tasks`` (default: every head).

    A packed batch (research.data.packing) passes its ``segment_ids`` and ``position_ids``
    [B, T] and ``num_segments``, the examples a row can hold (K): the encoder then attends
    within segments, and pooled heads return one output per example, [B, K, ...].
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tasks = self.task_names if tasks is None else tuple(tasks)
    # Heads that read only position 0 let the encoder's last layer skip the other positions.
    configs = dict(self.heads)
    first_only = all(t in configs and configs[t].first_token_only for t in tasks)
    encoder_cls = families.family_of(self.encoder).encoder
    packed = {}
    if segment_ids is not None:  # Only then: other families' encoders take no such arguments.
      packed = dict(segment_ids=segment_ids, position_ids=position_ids)
    features = encoder_cls(self.encoder, remat=self.remat, name="encoder", **kw)(
      input_ids,
      attention_mask,
      token_type_ids,
      deterministic=deterministic,
      first_token_only=first_only and segment_ids is None,
      **packed,
    )
    if segment_ids is not None:
      slots = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
      features = {**features, "segments": segment_ids[:, None, :] == slots[None, :, None]}
    return Heads(self.heads, name="heads", **kw)(features, attention_mask, tasks, deterministic)


def make_task_model(encoder: Any, heads: Mapping[str, HeadSpec], **kwargs: Any) -> TaskModel:
  """A TaskModel from a ``{task: HeadSpec}`` dict."""
  return TaskModel(encoder, tuple(heads.items()), **kwargs)


def init_params(model: TaskModel, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
  """Initial params (every head) from a dummy batch."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, ids, jnp.ones_like(ids))["params"]

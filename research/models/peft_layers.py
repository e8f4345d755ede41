"""The layers of parameter-efficient transfer: LoRA projections and bottleneck adapters.

This module holds what the encoder builds from ``EncoderConfig.peft`` (a
:class:`research.models.config.PeftConfig`); research.transfer.peft holds the optimizer rules,
the parameter counts and LoRA merging, which only read parameter trees. A LoRA layer decides by
its own module path (``encoder/layer_3/attention/query``, matched against ``lora_targets``)
whether it gets ``lora_a`` [in, r] and ``lora_b`` [r, out] beside its ``kernel`` and ``bias``.
``lora_b`` and an adapter's ``up`` projection start at zero, so at init every output equals the
base model's. Shared numerics (dropout, GELU, init) come from research.models.common, so this
module and the encoder do not import each other.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.common import dense_init, dropout, gelu_exact
from research.models.config import EncoderConfig, PeftConfig

Array = jax.Array
Dtype = Any

# Kaiming-uniform with a=sqrt(5), as the LoRA paper's code (and torch's nn.Linear) draws A.
LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_ENCODER_CHILD = re.compile(r"embeddings|layer_\d+|pooler")


def module_path(module: nn.Module) -> str:
  """``module``'s path in the parameter tree, "/"-joined (``encoder/layer_0/ffn/output``).

  An Encoder applied alone (paths start at ``embeddings``, ``layer_N`` or ``pooler``) gets the
  ``encoder/`` prefix, so targets written for the TaskModel tree match the same layers. The
  scope path is used rather than the parent chain, which lifted transforms (remat) cut.
  """
  names = tuple(module.path)
  if names and _ENCODER_CHILD.fullmatch(names[0]):
    names = ("encoder", *names)
  return "/".join(names)


def lora_params(
  module: nn.Module, peft: PeftConfig | None, shape: tuple[int, int], param_dtype: Dtype
) -> tuple[Array, Array] | None:
  """``(lora_a, lora_b)`` in ``module``'s scope when its path is a LoRA target, else None."""
  if peft is None or not peft.is_lora_target(module_path(module)):
    return None
  rank = peft.lora_rank
  a = module.param("lora_a", LORA_A_INIT, (shape[0], rank), param_dtype)
  b = module.param("lora_b", nn.initializers.zeros_init(), (rank, shape[1]), param_dtype)
  return a, b


def lora_delta(
  module: nn.Module,
  x: Array,
  pairs: list[tuple[int, Array, Array]],
  num_outputs: int,
  peft: PeftConfig,
  deterministic: bool,
  dtype: Dtype,
) -> Array:
  """``dropout(x) A B * alpha / r`` for a fused projection of ``num_outputs`` equal slices.

  ``pairs`` holds ``(slice index, A, B)`` of the slices that have LoRA. Two matmuls serve them
  all: ``x`` times the concatenated A's, times a block matrix holding each B at its slice.
  """
  rank, width = peft.lora_rank, pairs[0][2].shape[1]
  x = dropout(module, x.astype(dtype), peft.lora_dropout, deterministic)
  a = jnp.concatenate([a for _, a, _ in pairs], axis=1).astype(dtype)
  zeros = jnp.zeros((rank, width), dtype)
  rows = [
    jnp.concatenate([b.astype(dtype) if j == i else zeros for j in range(num_outputs)], axis=1)
    for i, _, b in pairs
  ]
  b = jnp.concatenate(rows, axis=0) * jnp.asarray(peft.lora_scale, dtype)
  return jnp.dot(jnp.dot(x, a), b)


class LoraDense(nn.Module):
  """``nn.Dense`` (same parameters, same arithmetic) plus a LoRA branch when its path is a target.

  Attributes:
    features: output width.
    peft: the PeftConfig.
    deterministic: no dropout on the LoRA branch.
  """

  features: int
  peft: PeftConfig
  deterministic: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    pair = lora_params(self, self.peft, shape, self.param_dtype)
    inputs, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if pair is None:
      return y
    delta = lora_delta(self, x, [(0, *pair)], 1, self.peft, self.deterministic, y.dtype)
    return y + delta


def dense(
  config: EncoderConfig, features: int, name: str, deterministic: bool, **kw: Any
) -> nn.Module:
  """An ``nn.Dense``, or a :class:`LoraDense` when ``config.peft`` is LoRA (call in compact)."""
  peft = config.peft
  if peft is not None and peft.method == "lora":
    return LoraDense(features, peft, deterministic, name=name, **kw)
  return nn.Dense(features, name=name, **kw)


class Adapter(nn.Module):
  """A residual bottleneck ``h + up(gelu(down(h)))``; ``up`` starts at zero (identity at init)."""

  size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    z = nn.Dense(self.size, kernel_init=dense_init(), name="down", **kw)(h)
    z = nn.Dense(h.shape[-1], kernel_init=nn.initializers.zeros_init(), name="up", **kw)(
      gelu_exact(z)
    )
    return h + z

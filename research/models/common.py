"""Numerics every model module shares: activations, initialisers, dropout and fp32 LayerNorm.

The encoder, the decoder, the heads and the PEFT layers all build on these. They live in one
module below all of them so that no model module has to import another for a helper (the
encoder and the PEFT layers used to import each other for ``dropout`` and ``gelu_exact``).

Speed notes (the train step spends its time here, measured on CPU and kept cheap everywhere):
exact GELU uses ``erf`` (XLA lowers ``erfc`` far more expensively); dropout masks come from a
counter-based hash of the element index instead of threefry (see :func:`dropout`), which is
several times cheaper and gives the same masks however the batch is sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any


def gelu_exact(x: Array) -> Array:
  """``x * Phi(x)`` through ``erf``, as PyTorch computes it (jax.nn.gelu goes through erfc)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1 / math.sqrt(2))).astype(x.dtype))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "gelu": gelu_exact,
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def dense_init(std: float = 0.02) -> nn.initializers.Initializer:
  """BERT's truncated-normal-like init (HF uses a plain normal with std 0.02)."""
  return nn.initializers.normal(stddev=std)


def _hash32(x: Array) -> Array:
  """``lowbias32`` (C. Wellons): a bijective 32-bit integer mix with good avalanche."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _element_index(shape: tuple[int, ...]) -> Array:
  """The row-major index of every element (mod 2**32), built from iotas so that XLA's SPMD
  partitioner gives each shard its global indices (a reshaped 1-D iota would not)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


def dropout(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
  """Inverted dropout with masks from a counter-based hash (not threefry).

  Each call draws two 32-bit seeds from ``module.make_rng('dropout')`` and keeps element ``i``
  when ``hash(hash(i ^ s0) + s1) >= rate * 2**32``. On CPU threefry's bit generation cost more
  than the attention matmuls it feeds; this is a handful of integer ops that fuse into the
  consumer. The mask depends only on the key and the element's global index, so a sharded
  batch gets exactly the masks of the unsharded one. (Per-device modes fold the device index
  into the key instead; see research.train.steps.)
  """
  if deterministic or rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  seeds = jax.random.bits(module.make_rng("dropout"), (2,), jnp.uint32)
  bits = _hash32(_hash32(_element_index(x.shape) ^ seeds[0]) + seeds[1])
  keep = bits >= np.uint32(min(round(rate * 2**32), 2**32 - 1))
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def layer_norm(x: Array, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> Array:
  """LayerNorm computed in fp32 whatever the compute dtype, cast back to ``dtype``.

  Call it inside a compact method: the LayerNorm becomes a child of the calling module.
  """
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)(x)
  return y.astype(dtype)

"""The layers of parameter-efficient transfer: LoRA projections and bottleneck adapters.

This module holds what every family with a ``peft`` config field builds from it (a
:class:`research.models.config.PeftConfig`): the BERT-like encoder and the decoder-only
families (research.models.decoder_only) take their projections from :func:`dense`, so one LoRA
implementation serves them all; research.transfer.peft holds the optimizer rules,
the parameter counts and LoRA merging, which only read parameter trees. A LoRA layer decides by
its own module path (``encoder/layer_3/attention/query``, matched against ``lora_targets``)
whether it gets ``lora_a`` [in, r] and ``lora_b`` [r, out] beside its ``kernel`` and ``bias``.
``lora_b`` and an adapter's ``up`` projection start at zero, so at init every output equals the
base model's. Shared numerics (dropout, GELU, init) come from research.models.common, so this
module and the encoder do not import each other. The NF4 codec at the end (:func:`nf4_quantize`,
:func:`nf4_matmul`) is QLoRA's storage for a frozen base, not yet wired into the projections.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models.common import dense_init, dropout, gelu_exact
from research.models.config import PeftConfig

Array = jax.Array
Dtype = Any

# Kaiming-uniform with a=sqrt(5), as the LoRA paper's code (and torch's nn.Linear) draws A.
LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The top-level children of a family encoder (the decoders add their untied ``lm_head``).
_ENCODER_CHILD = re.compile(r"embeddings|layer_\d+|pooler|lm_head")


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
    use_bias: False for the bias-free projections of Llama-style decoders (as ``nn.Dense``).
  """

  features: int
  peft: PeftConfig
  deterministic: bool = True
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    pair = lora_params(self, self.peft, shape, self.param_dtype)
    inputs, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if pair is None:
      return y
    delta = lora_delta(self, x, [(0, *pair)], 1, self.peft, self.deterministic, y.dtype)
    return y + delta


def dense(config: Any, features: int, name: str, deterministic: bool, **kw: Any) -> nn.Module:
  """An ``nn.Dense``, or a :class:`LoraDense` when ``config.peft`` is LoRA (call in compact).

  ``config`` is any family's config with a ``peft`` field (EncoderConfig, the decoders'); the
  parameters are the ``nn.Dense``'s either way, so LoRA only adds ``lora_a`` / ``lora_b``.
  """
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


# --- NF4 storage for QLoRA's frozen base (Dettmers et al. 2023) ----------------------------
# The codec only: the base kernels of a QLoRA run are stored as 4-bit NormalFloat indices with
# one absmax per block of 64 weights, the absmaxes themselves stored in 8 bits (double
# quantisation: minus their mean, then blockwise 8-bit over 256 with bitsandbytes' dynamic
# code), and dequantised inside the matmul (:func:`nf4_matmul`). Wiring it into the families'
# projections and the optimizer (integer leaves have no gradient) is still to come.

# bitsandbytes' NF4 code book: quantiles of N(0, 1) scaled to [-1, 1], an exact zero, and one
# more positive value than negative (create_normal_map(offset=0.9677083)).
NF4_CODE = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
NF4_BLOCK = 64  # Weights per absmax.
ABSMAX_BLOCK = 256  # Absmaxes per second-level scale.


def dynamic_code() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``): 256 sorted
  values in [-1, 1], dense near zero (a sign, a decimal exponent, a linear fraction)."""
  values = [0.0, 1.0]
  for i in range(7):
    bounds = np.linspace(0.1, 1, 2**i + 1, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    values += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
  return np.sort(np.asarray(values, np.float32))


def _nearest(code: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Index of the code value nearest each of ``x`` (``code`` sorted): what bitsandbytes'
  decision tree computes."""
  right = np.clip(np.searchsorted(code, x), 1, len(code) - 1)
  left = right - 1
  return np.where(np.abs(x - code[left]) <= np.abs(code[right] - x), left, right).astype(np.uint8)


def nf4_quantize(w: np.ndarray) -> dict[str, np.ndarray]:
  """``w`` (any shape, size a multiple of 64) as NF4 with double-quantised absmaxes.

  Returns ``{'codes': uint8 [size/2] (two 4-bit indices a byte, the first in the high nibble),
  'absmax': uint8 [size/64], 'scale': float32 [ceil(size/64/256)], 'offset': float32 []}``:
  about 4.127 bits a weight. Host-side (numpy): done once, when the base is loaded.

  Raises:
    ValueError: a size that 64 does not divide.
  """
  flat = np.asarray(w, np.float32).reshape(-1)
  if flat.size % NF4_BLOCK:
    raise ValueError(f"NF4: {flat.size} weights is not a multiple of the block {NF4_BLOCK}")
  blocks = flat.reshape(-1, NF4_BLOCK)
  absmax = np.max(np.abs(blocks), axis=1)
  safe = np.where(absmax > 0, absmax, 1.0)[:, None]
  idx = _nearest(NF4_CODE, blocks / safe).reshape(-1)
  codes = (idx[0::2] << 4) | idx[1::2]
  offset = np.float32(absmax.mean())
  centred = absmax - offset
  pad = (-centred.size) % ABSMAX_BLOCK
  groups = np.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
  scale = np.max(np.abs(groups), axis=1)
  scale_safe = np.where(scale > 0, scale, 1.0)[:, None]
  q = _nearest(dynamic_code(), groups / scale_safe).reshape(-1)[: centred.size]
  return {"codes": codes.astype(np.uint8), "absmax": q, "scale": scale, "offset": offset}


def nf4_dequantize(
  q: dict[str, Array], shape: tuple[int, ...], dtype: Dtype = jnp.float32
) -> Array:
  """The weights of :func:`nf4_quantize`'s output, ``shape`` and ``dtype`` (jit-traceable)."""
  code8 = jnp.asarray(dynamic_code())
  n_abs = q["absmax"].shape[0]
  scale = jnp.repeat(q["scale"], ABSMAX_BLOCK)[:n_abs]
  absmax = code8[q["absmax"].astype(jnp.int32)] * scale + q["offset"]
  codes = q["codes"].astype(jnp.int32)
  idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1, NF4_BLOCK)
  w = jnp.asarray(NF4_CODE)[idx] * absmax[:, None]
  return w.reshape(shape).astype(dtype)


def nf4_matmul(x: Array, q: dict[str, Array], shape: tuple[int, int]) -> Array:
  """``x @ W`` with ``W`` [in, out] held as NF4: dequantised to ``x``'s dtype inside the
  jitted computation, so only the 4-bit codes stay resident between steps."""
  return jnp.dot(x, nf4_dequantize(q, shape, x.dtype))

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
module and the encoder do not import each other. DoRA (``peft.use_dora``) is a LoRA target with
a trained magnitude (:func:`dora_output`). The NF4 codec at the end (:func:`nf4_quantize`,
:func:`nf4_dequantize`) is QLoRA's storage for the frozen base (``peft.quantize='nf4'``): every
projection :func:`dense` builds keeps its kernel as ``kernel_nf4`` (uint8 codes, double-quantised
absmaxes) and dequantises it inside the matmul.
"""

from __future__ import annotations

import functools
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

  Raises:
    NotImplementedError: DoRA, whose column norms need the fused kernel split per slice
      (the BERT-like encoder's fused q/k/v); :class:`LoraDense` computes DoRA itself.
  """
  if peft.use_dora:
    raise NotImplementedError("model.peft.use_dora: not implemented for fused projections")
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

  With ``peft.quantize='nf4'`` the kernel is stored as ``kernel_nf4`` (:func:`nf4_quantize`'s
  dict) and dequantised to the compute dtype at each use, forward and backward (QLoRA,
  :func:`nf4_dot`); it has no gradient, as the base of a QLoRA run is frozen by definition (and
  a gradient through its two fp32 scales would cost a full-size ``dW`` per projection). With
  ``peft.use_dora`` a target also has ``lora_magnitude`` [out] and computes DoRA
  (:func:`dora_output`).

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
  def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
    """``x W + b`` plus the LoRA (or DoRA) term; ``deterministic`` overrides the attribute
    (layers built in ``setup``, such as BART's, learn it only when called)."""
    deterministic = self.deterministic if deterministic is None else deterministic
    shape = (x.shape[-1], self.features)
    stored = None
    if nf4_stored(self.peft, module_path(self), shape):
      init = lambda rng: nf4_quantize(self.kernel_init(rng, shape, jnp.float32), xp=jnp)
      stored = self.param("kernel_nf4", init)
      kernel = nf4_dequantize(jax.lax.stop_gradient(stored), shape, self.dtype or self.param_dtype)
    else:
      kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    pair = lora_params(self, self.peft, shape, self.param_dtype)
    magnitude = None
    if pair is not None and self.peft.use_dora:
      norm = lambda _: column_norm(kernel.astype(jnp.float32))  # B = 0: ||W|| per column.
      magnitude = self.param("lora_magnitude", norm).astype(self.param_dtype)
    inputs, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    matmul = lambda v: jax.lax.dot_general(v, kernel, (((v.ndim - 1,), (0,)), ((), ())))
    if stored is not None and magnitude is None:  # (DoRA needs the whole kernel for its norm.)
      matmul = lambda v: nf4_dot(v, stored, shape)
    y = matmul(inputs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if magnitude is not None:  # peft adds the DoRA term to the base layer's output, bias in.
      return y + dora_output(self, inputs, kernel, pair, magnitude, matmul, deterministic)
    if pair is not None:
      y = y + lora_delta(self, x, [(0, *pair)], 1, self.peft, deterministic, y.dtype)
    return y


def column_norm(w: Array) -> Array:
  """The L2 norm of each output column of a kernel ``[in, out]`` (peft's ``dim=1`` of ``[out,
  in]``): DoRA's magnitude at init, and its normaliser."""
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=0))


def dora_output(
  module: LoraDense,
  x: Array,
  kernel: Array,
  pair: tuple[Array, Array],
  magnitude: Array,
  matmul: Any,
  deterministic: bool | None = None,
) -> Array:
  """What DoRA adds to ``x W + b`` to make it ``x (m / ||W + s A B||_c) (W + s A B) + b``.

  As peft's ``DoraLinearLayer``: the column norm is detached (section 4.3 of the DoRA paper:
  it reflects the update but gets no gradient), and the term is ``(m/n - 1) xd W + (m/n) xd A B
  s`` with ``xd`` the dropped-out input (``x`` itself when deterministic), so the base path
  keeps the undropped input, as peft's. The merged weight is formed only for its norm.
  """
  peft, dtype = module.peft, x.dtype
  scale = jnp.asarray(peft.lora_scale, jnp.float32)
  a, b = pair
  delta_w = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
  merged = kernel.astype(jnp.float32) + scale * delta_w
  norm = jax.lax.stop_gradient(column_norm(merged))
  ratio = (magnitude.astype(jnp.float32) / norm).astype(dtype)
  deterministic = module.deterministic if deterministic is None else deterministic
  dropped = dropout(module, x, peft.lora_dropout, deterministic)
  lora = jnp.dot(jnp.dot(dropped, a.astype(dtype)), b.astype(dtype)) * scale.astype(dtype)
  return (ratio - 1) * matmul(dropped) + ratio * lora


def nf4_stored(peft: PeftConfig | None, path: str, shape: tuple[int, int]) -> bool:
  """Whether a projection of ``shape`` keeps its kernel in NF4: under ``quantize='nf4'``, every
  projection :func:`dense` builds whose size the 64-weight block divides and whose output width
  is even (its codes are then ``[in, out/2]``, so the stored kernel keeps its shape); others
  stay float, and so does an ``lm_head`` (at ``path``), as transformers' 4-bit loading keeps
  it: the output layer is the most sensitive to quantisation."""
  quantizable = (shape[0] * shape[1]) % NF4_BLOCK == 0 and shape[1] % 2 == 0
  quantizable = quantizable and path.rsplit("/", 1)[-1] != "lm_head"
  return peft is not None and peft.quantize == "nf4" and quantizable


def dense(config: Any, features: int, name: str, deterministic: bool, **kw: Any) -> nn.Module:
  """An ``nn.Dense``, or a :class:`LoraDense` when ``config.peft`` is LoRA (call in compact).

  ``config`` is any family's config with a ``peft`` field (EncoderConfig, the decoders'); the
  parameters are the ``nn.Dense``'s either way, so LoRA only adds ``lora_a`` / ``lora_b`` (and
  DoRA ``lora_magnitude``); under ``quantize='nf4'`` every projection made here holds its
  kernel as ``kernel_nf4``, LoRA target or not.
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


def _nearest(code: Any, x: Any, xp: Any = np) -> Any:
  """Index of the code value nearest each of ``x`` (``code`` sorted): what bitsandbytes'
  decision tree computes. ``xp`` is numpy or jax.numpy."""
  right = xp.clip(xp.searchsorted(code, x), 1, len(code) - 1)
  left = right - 1
  return xp.where(xp.abs(x - code[left]) <= xp.abs(code[right] - x), left, right).astype(xp.uint8)


def nf4_quantize(w: Any, xp: Any = np) -> dict[str, Any]:
  """``w`` (any shape, size a multiple of 64) as NF4 with double-quantised absmaxes.

  Returns ``{'codes': uint8 [..., last/2] (``w``'s shape with the last axis halved, so a stored
  kernel still tells its shape; [size/2] when the last axis is odd; two 4-bit indices a byte,
  in row-major order, the first in the high nibble),
  'absmax': uint8 [size/64], 'scale': float32 [ceil(size/64/256)], 'offset': float32 []}``:
  about 4.127 bits a weight. With numpy (``xp=np``, the default) on the host, when a base is
  loaded; with ``xp=jax.numpy`` it traces, so a model's init can draw a kernel and store it
  quantised inside the jitted init (the float kernel never outlives its layer's init).

  Raises:
    ValueError: a size that 64 does not divide.
  """
  flat = xp.asarray(w, xp.float32).reshape(-1)
  if flat.size % NF4_BLOCK:
    raise ValueError(f"NF4: {flat.size} weights is not a multiple of the block {NF4_BLOCK}")
  blocks = flat.reshape(-1, NF4_BLOCK)
  absmax = xp.max(xp.abs(blocks), axis=1)
  safe = xp.where(absmax > 0, absmax, 1.0)[:, None]
  idx = _nearest(xp.asarray(NF4_CODE), blocks / safe, xp).reshape(-1)
  codes = (idx[0::2] << 4) | idx[1::2]
  offset = xp.mean(absmax).astype(xp.float32)
  centred = absmax - offset
  pad = (-centred.size) % ABSMAX_BLOCK
  groups = xp.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
  scale = xp.max(xp.abs(groups), axis=1)
  scale_safe = xp.where(scale > 0, scale, 1.0)[:, None]
  q = _nearest(xp.asarray(dynamic_code()), groups / scale_safe, xp).reshape(-1)[: centred.size]
  if np.ndim(w) and np.shape(w)[-1] % 2 == 0:  # [..., last/2]: stored codes keep the shape.
    codes = codes.reshape(*np.shape(w)[:-1], np.shape(w)[-1] // 2)
  return {"codes": codes.astype(xp.uint8), "absmax": q, "scale": scale, "offset": offset}


def nf4_dequantize(
  q: dict[str, Array], shape: tuple[int, ...], dtype: Dtype = jnp.float32
) -> Array:
  """The weights of :func:`nf4_quantize`'s output, ``shape`` and ``dtype`` (jit-traceable)."""
  code8 = jnp.asarray(dynamic_code())
  n_abs = q["absmax"].shape[0]
  scale = jnp.repeat(q["scale"], ABSMAX_BLOCK)[:n_abs]
  absmax = code8[q["absmax"].astype(jnp.int32)] * scale + q["offset"]
  codes = q["codes"].reshape(-1).astype(jnp.int32)
  idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1, NF4_BLOCK)
  w = jnp.asarray(NF4_CODE)[idx] * absmax[:, None]
  return w.reshape(shape).astype(dtype)


def nf4_shape(q: dict[str, Any]) -> tuple[int, int]:
  """``[in, out]`` of a kernel stored by :func:`nf4_quantize` (its codes are ``[in, out/2]``)."""
  rows, half = q["codes"].shape
  return rows, 2 * half


def _dot(x: Array, w: Array) -> Array:
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def nf4_dot(x: Array, q: dict[str, Array], shape: tuple[int, int]) -> Array:
  """``x @ W`` for an NF4 kernel, dequantised to ``x``'s dtype at each use, forward and backward.

  A custom VJP keeps only the codes as the backward's residual, and each dequantisation is tied
  to the activation it multiplies (:func:`_tied`): otherwise XLA computes one dequantised
  kernel per projection for the forward, the rematerialised forward and the backward alike (or
  hoists it out of a gradient-accumulation loop), so the full-precision kernels of every layer
  exist at once and NF4 saves little. The kernel gets a zero cotangent: a QLoRA base is frozen.
  """
  return _dot(x, nf4_dequantize(q, shape, x.dtype))


def _tied(q: dict[str, Array], v: Array) -> dict[str, Array]:
  """``q`` made to depend on ``v`` at no cost to its value, so that XLA cannot compute a
  dequantisation before ``v`` exists, nor share it between uses with different ``v``: XLA:CPU
  drops optimisation barriers before its scheduling, so they alone do not keep each layer's
  dequantised kernel from being computed once and kept live through the backward pass."""
  q, v = jax.lax.optimization_barrier((q, v))
  first = jax.lax.stop_gradient(v.reshape(-1)[0]).astype(jnp.float32)
  tie = jnp.where(jnp.isfinite(first), first * 0.0, 0.0)  # 0, even for an inf or nan input.
  return dict(q, offset=q["offset"] + tie)


def _nf4_dot_fwd(x: Array, q: dict[str, Array], shape: tuple[int, int]) -> tuple[Array, Any]:
  return _dot(x, nf4_dequantize(_tied(q, x), shape, x.dtype)), q


def _nf4_dot_bwd(shape: tuple[int, int], q: dict[str, Array], dy: Array) -> tuple[Array, Any]:
  w = nf4_dequantize(_tied(q, dy), shape, dy.dtype)
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
  zero = lambda v: (
    np.zeros(v.shape, jax.dtypes.float0)
    if not jnp.issubdtype(v.dtype, jnp.inexact)
    else jnp.zeros_like(v)
  )
  return dx, jax.tree.map(zero, q)


nf4_dot.defvjp(_nf4_dot_fwd, _nf4_dot_bwd)


def nf4_matmul(x: Array, q: dict[str, Array], shape: tuple[int, int]) -> Array:
  """``x @ W`` with ``W`` [in, out] held as NF4: dequantised to ``x``'s dtype inside the
  jitted computation, so only the 4-bit codes stay resident between steps."""
  return jnp.dot(x, nf4_dequantize(q, shape, x.dtype))

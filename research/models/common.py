"""Numerics every model module shares: activations, initialisers, dropout, fp32 LayerNorm and
attention.

The encoder, the decoder, the heads and the PEFT layers all build on these. They live in one
module below all of them so that no model module has to import another for a helper (the
encoder and the PEFT layers used to import each other for ``dropout`` and ``gelu_exact``).

Speed notes (the train step spends its time here, measured on CPU and kept cheap everywhere):
exact GELU uses ``erf`` (XLA lowers ``erfc`` far more expensively); dropout masks come from a
counter-based hash of the element index instead of threefry (see :func:`dropout`), which is
several times cheaper and gives the same masks however the batch is sharded.

Attention (:func:`attention`) is one function for every model (encoders, MPNet's relative
bias, the seq2seq decoder and its cache, the decoder-only families with grouped keys/values) so
that the kernel is chosen in one place: ``jax.nn.dot_product_attention`` with XLA's kernel, or
cuDNN's fused one on a GPU in bf16/fp16.
"""

from __future__ import annotations

import math
import os
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


# --- attention ------------------------------------------------------------------------------------

ATTENTION_ENV = (
  "RESEARCH_ATTENTION"  # auto (default) | xla | cudnn: the kernel :func:`attention` uses.
)
IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# A masked logit in the written-out paths: jax's XLA attention's own value (finite, so a row
# with nothing to attend to gets uniform weights instead of NaNs).
MASKED_LOGIT = np.float32(-0.7 * float(np.finfo(np.float32).max))


def attention_implementation(requested: str | None = None) -> str:
  """The implementation :func:`attention` is asked for: ``requested``, else ``$RESEARCH_ATTENTION``,
  else ``'auto'``.

  Raises:
    ValueError: a name outside :data:`IMPLEMENTATIONS`.
  """
  name = (requested or os.environ.get(ATTENTION_ENV, "") or "auto").strip().lower()
  if name not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {name!r} (${ATTENTION_ENV}?): expected one of {IMPLEMENTATIONS}"
    )
  return name


def _cudnn_fits(q: Array, k: Array, biased: bool = False) -> bool:
  """Whether cuDNN's fused attention can take these inputs: a GPU, fp16/bf16, a head dim that
  is a multiple of 8 and at most 128 (256 from Hopper on; 128 keeps one answer for every GPU),
  at least two queries (a decoding step is a matrix-vector product that the fused kernel does
  not speed up) and, with a bias or mask (``biased``), even query and key lengths.

  jax checks the same at trace time, but its training-time check (even lengths with a bias)
  runs in the custom VJP's forward rule, which under ``jax.checkpoint`` (remat) is traced after
  this call has returned, too late to fall back to XLA; so they are checked here first.
  """
  even = not biased or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)
  return even and (
    jax.default_backend() == "gpu"
    and q.dtype in _CUDNN_DTYPES
    and k.dtype == q.dtype
    and q.shape[-1] % 8 == 0
    and q.shape[-1] <= 128
    and q.shape[1] > 1
  )


def _as_4d(t: Array | None, name: str) -> Array | None:
  """``t`` with leading axes added up to [B|1, N|1, T|1, S] (bias and mask may come 2- or 3-D)."""
  if t is None:
    return None
  if t.ndim > 4:
    raise ValueError(f"attention {name} of shape {t.shape}: expected at most 4 axes [B, N, T, S]")
  return t.reshape((1,) * (4 - t.ndim) + t.shape)


def attention(
  q: Array,
  k: Array,
  v: Array,
  *,
  mask: Array | None = None,
  bias: Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  weights_dropout: Callable[[Array], Array] | None = None,
  heads_major: bool = False,
  beam_rows: Array | None = None,
) -> Array:
  """Softmax attention ``softmax(q k^T * scale + bias, masked) v`` through
  ``jax.nn.dot_product_attention``: the one attention every model module calls.

  Numerics whatever the input dtype: logits, bias and softmax in fp32 (bf16 inputs get fp32
  accumulation), the weights cast back to the inputs' dtype for the product with ``v``. A
  masked logit gets a large finite negative value, so a row with nothing to attend to (a padded
  query) gets uniform weights, not NaNs; its output is padding and ignored downstream.

  Kernel (``implementation``, else ``$RESEARCH_ATTENTION``, else ``'auto'``): ``'auto'`` takes
  cuDNN's fused flash attention on a GPU when the inputs suit it (fp16/bf16, head dim a multiple
  of 8 up to 128, more than one query, even lengths when masked) and XLA's otherwise (CPU, TPU,
  fp32, decoding steps); if jax refuses a shape for cuDNN at trace time, XLA's is used.
  ``'xla'`` and ``'cudnn'`` force one (``'cudnn'`` raises where it cannot run).
  ``weights_dropout``, a function applied to the attention weights (training with attention
  dropout), cannot be expressed through ``jax.nn.dot_product_attention``: that case runs the
  same fp32 computation written out, with the dropout between the softmax and the product with
  ``v``.

  Keys and values from a decoding cache come heads-major, ``[B, K, S, H]`` (``heads_major``,
  :func:`write_kv_cache`): a decoding step is one query per row, a matrix-vector product per
  head that streams the whole cache, and in the ``[B, S, K, H]`` layout XLA:CPU first
  transposes the cache (several times the cost of the product itself); heads-major they are
  read in place, through the same fp32 computation written out. With more than one query
  (a prompt) and cuDNN at hand, they are transposed back for the fused kernel.

  Beam search never reorders the cache (``beam_rows``): copying every layer's keys and values
  along the surviving beams at every step costs more than the step's attention. Each beam's
  positions stay in the row of the beam that wrote them, and ``beam_rows [G, k, S]`` (``G``
  sources of ``k`` beams, ``G * k = B``) says, for each beam and position, which of its source's
  ``k`` rows holds that position. Each beam's query attends to all ``k`` rows of its source
  with the other rows' keys masked: ``k`` times the logits of a plain step, which cost less
  than the copy (docs/benchmarks.md, "Decoding").

  Args:
    q: queries [B, T, N, H].
    k, v: keys and values [B, S, K, H] ([B, K, S, H] with ``heads_major``), K dividing N
      (grouped-query attention when K < N: each key/value head serves N/K consecutive query
      heads, as jax and transformers group them).
    mask: boolean (or 0/1) [B|1, N|1, T|1, S], or fewer leading axes; True attends.
    bias: additive, broadcastable to [B, N, T, S] the same way (a relative position bias).
    scale: the logits' scale; None is ``1 / sqrt(H)``.
    implementation: 'auto', 'xla' or 'cudnn' (None: the environment's or 'auto').
    weights_dropout: applied to the fp-cast weights before the product with ``v``.
    heads_major: ``k`` and ``v`` are [B, K, S, H] (a decoding cache's layout).
    beam_rows: int [G, k, S] with ``heads_major``: which of a source's ``k`` rows holds each
      beam's key at each position (above); None: every row holds its own.

  Returns:
    [B, T, N, H] in the dtype of ``v``.
  """
  mask = _as_4d(mask, "mask")
  bias = _as_4d(bias, "bias")
  if mask is not None and mask.dtype != jnp.bool_:
    mask = mask.astype(jnp.bool_)
  scale = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
  name = attention_implementation(implementation)
  biased = mask is not None or bias is not None
  if beam_rows is not None:  # Decoding: deterministic, over the cache.
    if not heads_major or weights_dropout is not None:
      raise ValueError("attention: beam_rows needs heads-major keys/values and no dropout")
    return _attention_over_beams(q, k, v, mask, bias, scale, beam_rows)
  if heads_major:
    k_bskh = to_heads_major(k)  # The same swap both ways.
    fused = name == "cudnn" or (name == "auto" and _cudnn_fits(q, k_bskh, biased))
    if weights_dropout is not None or q.shape[1] == 1 or not fused:
      return _attention_written_out(q, k, v, mask, bias, scale, weights_dropout, heads_major)
    k, v = k_bskh, to_heads_major(v)
  if weights_dropout is not None:
    return _attention_written_out(q, k, v, mask, bias, scale, weights_dropout)
  if name == "cudnn" or (name == "auto" and _cudnn_fits(q, k, biased)):
    try:
      return _attention_cudnn(q, k, v, mask, bias, scale)
    except (NotImplementedError, ValueError, RuntimeError):  # Shape, dtype or cuDNN version.
      if name == "cudnn":
        raise
  if bias is not None:
    bias = bias.astype(jnp.float32)  # Joins the fp32 logits.
  return jax.nn.dot_product_attention(
    q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla"
  )


def _attention_cudnn(
  q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: float
) -> Array:
  """cuDNN's kernel. It takes one bias of the inputs' dtype spanning the whole [T, S], so the
  mask folds into it and both are broadcast there. A masked logit gets jax's own cuDNN mask
  value (-2**41 in bf16, -2**15 in fp16: jax works around a cuDNN bug with large negative
  differences). The bias is clipped there too, so that an fp32 bias already holding a mask
  (fp32's finfo.min, infinite in fp16/bf16) or bias plus mask stays finite."""
  t, s = q.shape[1], k.shape[1]
  neg = jnp.float32(-(2.0**41) if q.dtype == jnp.bfloat16 else -(2.0**15))
  total = None
  if bias is not None:
    total = bias.astype(jnp.float32)
  if mask is not None:
    masked = jnp.where(mask, jnp.float32(0.0), neg)
    total = masked if total is None else total + masked
  if total is not None:
    total = jnp.maximum(total, neg)
    total = jnp.broadcast_to(total, (*total.shape[:2], t, s)).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=total, scale=scale, implementation="cudnn")


def _attention_written_out(
  q: Array,
  k: Array,
  v: Array,
  mask: Array | None,
  bias: Array | None,
  scale: float,
  weights_dropout: Callable[[Array], Array] | None,
  heads_major: bool = False,
) -> Array:
  """jax's XLA attention (its ``_dot_product_attention_core``), with dropout on the weights
  (``weights_dropout``) or over heads-major keys/values."""
  b, t, n, h = q.shape
  kv_heads = k.shape[1 if heads_major else 2]
  kv = "bksh" if heads_major else "bskh"
  group = lambda x: None if x is None else _grouped(x, kv_heads, n // kv_heads)
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum(f"btkgh,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  if bias is not None:
    logits = logits + group(bias).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(group(mask), logits, MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if weights_dropout is not None:
    weights = weights_dropout(weights)
  out = jnp.einsum(f"bkgts,{kv}->btkgh", weights, v)
  return out.reshape(b, t, n, h)


def _attention_over_beams(
  q: Array,
  k: Array,
  v: Array,
  mask: Array | None,
  bias: Array | None,
  scale: float,
  beam_rows: Array,
) -> Array:
  """:func:`attention` of each beam over its source's ``k`` cache rows, the rows that do not
  hold its positions (``beam_rows``) masked; ``k, v`` heads-major."""
  sources, beams, length = beam_rows.shape
  b, t, n, h = q.shape
  kv_heads = k.shape[1]
  groups = n // kv_heads
  qb = q.reshape(sources, beams, t, kv_heads, groups, h)
  kb, vb = (x.reshape(sources, beams, kv_heads, length, h) for x in (k, v))
  # Axes: z source, j the querying beam, r the row read, k/g heads, t queries, s positions.
  logits = jnp.einsum("zjtkgh,zrksh->zjkgtrs", qb, kb, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)

  def per_beam(x: Array) -> Array:  # [B|1, N|1, T|1, S] -> [Z|1, J|1, K|1, G|1, T|1, 1, S]
    x = _grouped(x, kv_heads, groups)
    x = x[None] if x.shape[0] == 1 else x.reshape(sources, beams, *x.shape[1:])
    return x[..., None, :]

  if bias is not None:
    logits = logits + per_beam(bias).astype(jnp.float32)
  own = beam_rows[:, :, None, :] == jnp.arange(beams, dtype=beam_rows.dtype)[:, None]
  keep = own[:, :, None, None, None]  # [Z, J, 1, 1, 1, R, S]
  if mask is not None:
    keep = keep & per_beam(mask)
  logits = jnp.where(keep, logits, MASKED_LOGIT)
  flat = logits.reshape(*logits.shape[:-2], beams * length)
  weights = jax.nn.softmax(flat, axis=-1).reshape(logits.shape).astype(v.dtype)
  out = jnp.einsum("zjkgtrs,zrksh->zjtkgh", weights, vb)
  return out.reshape(b, t, n, h)


def empty_kv_cache(
  batch: int, length: int, kv_heads: int, head_dim: int, dtype: Dtype = jnp.float32
) -> dict[str, Array]:
  """One layer's decoding cache: zero ``key``/``value`` ``[batch, kv_heads, length, head_dim]``
  (heads-major, see :func:`attention`)."""
  zeros = jnp.zeros((batch, kv_heads, length, head_dim), dtype)
  return {"key": zeros, "value": zeros}


def to_heads_major(x: Array) -> Array:
  """``[B, S, K, H]`` keys or values as ``[B, K, S, H]`` (the cache's layout)."""
  return jnp.swapaxes(x, 1, 2)


def cache_length(layer: dict[str, Array]) -> int:
  """The positions a layer's cache (:func:`empty_kv_cache`) holds."""
  return layer["key"].shape[2]


def write_kv_cache(
  layer: dict[str, Array], index: Array, k: Array, v: Array
) -> tuple[Array, Array, dict[str, Array]]:
  """Writes ``k, v [B, T, K, H]`` at positions ``index ... index + T - 1`` of a layer's cache;
  returns ``(all keys, all values, new layer)``, the first two heads-major in ``k``'s dtype (for
  :func:`attention` with ``heads_major=True``)."""
  start = (0, 0, index, 0)
  keys = jax.lax.dynamic_update_slice(
    layer["key"], to_heads_major(k).astype(layer["key"].dtype), start
  )
  values = jax.lax.dynamic_update_slice(
    layer["value"], to_heads_major(v).astype(layer["value"].dtype), start
  )
  return keys.astype(k.dtype), values.astype(v.dtype), {"key": keys, "value": values}


def _grouped(x: Array, kv_heads: int, groups: int) -> Array:
  """A [B|1, N|1, T|1, S] bias or mask as [B|1, K|1, G|1, T|1, S] for grouped heads."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])


def argmax(x: Array) -> Array:
  """``jnp.argmax(x, axis=-1)`` as int32 (the first index of the maximum), as a max and a
  min-reduction: XLA:CPU runs ``argmax``'s paired value/index reduction several times slower,
  which over a vocabulary at every decoding step adds up. A row holding NaN gives its last
  index (``jnp.argmax`` would give the NaN's)."""
  width = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jnp.where(x == top, jnp.arange(width, dtype=jnp.int32), width)
  return jnp.minimum(jnp.min(index, axis=-1), width - 1)


def gather_beams(x: Array, index: Array) -> Array:
  """``x[b, index[b, j]]`` for ``x [B, K, ...]`` and ``index [B, J]``: beam search's selection
  of hypotheses (research.models.decoding, research.models.encoder_decoder.core)."""
  index = index.reshape(*index.shape, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, index, axis=1)


def beam_rows_at(rows: Array, index: Array) -> Array:
  """``rows [G, k, S]`` (:func:`attention`'s ``beam_rows``) with position ``index`` in each
  beam's own row: where a decoding step writes its keys."""
  beams = rows.shape[1]
  own = jnp.broadcast_to(jnp.arange(beams, dtype=rows.dtype)[None, :], rows.shape[:2])
  return jax.lax.dynamic_update_index_in_dim(rows, own, index, axis=2)

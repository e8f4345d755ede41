"""T5 (v1.0 and v1.1), mT5 and UMT5: one encoder-decoder module, three families.

What the variants share: pre-norm blocks with T5's RMS norm (no mean, no bias), attention
without biases and without the ``1/sqrt(d)`` scaling, relative position biases from log-spaced
buckets (bidirectional in the encoder, causal in the decoder) added to the attention scores,
no absolute positions, one token table for encoder input, decoder input and (tied) output.
What differs is data, read from ``config.json`` (and the weights) in :func:`config_from_hf`:

- T5 v1.0: ReLU feed-forward ``wo(relu(wi(x)))``, tied output layer, the decoder's last hidden
  states scaled by ``d_model ** -0.5`` before it;
- T5 v1.1 and mT5: gated-GELU feed-forward ``wo(gelu_tanh(wi_0(x)) * wi_1(x))``, an untied
  ``lm_head`` and no output scaling;
- UMT5: v1.1 with a relative position bias table in every layer, not only the first.

Parameter paths (the encoder-decoder seam of research.models.encoder_decoder.core):
``encoder/embeddings/word_embeddings/embedding`` (HF ``shared.weight``, the one token table),
``encoder/layer_N/attention_norm/scale``, ``encoder/layer_N/attention/{query,key,value,output}/
kernel``, ``encoder/layer_0/attention/relative_attention_bias/embedding`` (every layer in UMT5),
``encoder/layer_N/ffn_norm/scale``, ``encoder/layer_N/ffn/{gate,up,down}/kernel`` (gated;
``up``/``down`` for ReLU), ``encoder/final_norm/scale``; the decoder's the same under
``decoder/`` plus ``decoder/layer_N/cross_attention_norm/scale`` and
``decoder/layer_N/cross_attention/{query,key,value,output}/kernel``; an untied output layer at
``lm_head/kernel``. :class:`T5Encoder` (the family's ``encoder``) builds the ``encoder`` subtree
alone, so classification from the encoder and the seq2seq model read the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models import peft_layers
from research.models.common import (
  ACTIVATIONS,
  cache_length,
  dropout,
  to_heads_major,
  write_kv_cache,
)
from research.models.config import PeftConfig
from research.models.encoder_decoder import core
from research.models.family import HEADS, MATRIX_SHARDING, WHOLE_MODEL_RULES, Family

Array = jax.Array
SHARED = "shared.weight"
LM_HEAD = "lm_head.weight"
ARCHITECTURES = {
  "t5": "T5ForConditionalGeneration",
  "mt5": "MT5ForConditionalGeneration",
  "umt5": "UMT5ForConditionalGeneration",
}
ENCODER_ARCHITECTURES = {
  "t5": "T5EncoderModel",
  "mt5": "MT5EncoderModel",
  "umt5": "UMT5EncoderModel",
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5-style encoder-decoder (hashable: it sits inside linen Modules).

  ``gated`` and ``hidden_act`` come from HF's ``feed_forward_proj`` (``"relu"``,
  ``"gated-gelu"``); ``relative_bias_every_layer`` is UMT5's; ``tie_word_embeddings`` means the
  output layer is the token table (no ``lm_head``) and ``scale_decoder_outputs`` the
  ``d_model ** -0.5`` before it (T5 v1.0); ``encoder_only`` is a checkpoint without decoder
  weights (``T5EncoderModel``): its encoder serves classification, and no seq2seq model is
  built from it. ``peft`` adds LoRA to the projections its targets name, or bottleneck
  adapters to every layer of both stacks (:func:`_adapt`); BitFit is refused: T5 has no biases.
  """

  model_type: str = "t5"
  vocab_size: int = 32128
  hidden_size: int = 512
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  head_dim: int = 64
  intermediate_size: int = 2048
  hidden_act: str = "relu"
  gated: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  relative_bias_every_layer: bool = False
  layer_norm_eps: float = 1e-6
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool = True
  encoder_only: bool = False
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  hf_config_json: str = "{}"
  peft: PeftConfig | None = None

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.peft is not None and self.peft.method == "bitfit":
      # Training the RMS norm scales instead would be another method, not BitFit.
      raise ValueError(
        f"model.peft.method='bitfit': the {self.model_type} family has no biases to train "
        "(bias-free projections, RMS norms without bias); use 'lora'"
      )

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kwargs: Any) -> T5Config:
    return dataclasses.replace(self, **kwargs)


# Each variant's defaults, what ``tiny`` and a config.json without the keys start from.
VARIANTS: dict[str, dict[str, Any]] = {
  "t5": {},
  "mt5": dict(hidden_act="gelu_new", gated=True, tie_word_embeddings=False),
  "umt5": dict(
    hidden_act="gelu_new", gated=True, tie_word_embeddings=False, relative_bias_every_layer=True
  ),
}


def tiny(model_type: str = "t5", **kwargs: Any) -> T5Config:
  """A 2-layer, 32-wide ``model_type`` model (4 heads of 8, 16 buckets) for tests."""
  sizes = dict(
    vocab_size=99,
    hidden_size=32,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    head_dim=8,
    intermediate_size=37,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=32,
  )
  scale = VARIANTS[model_type].get("tie_word_embeddings", True) and model_type != "mt5"
  base = dict(model_type=model_type, scale_decoder_outputs=scale, **VARIANTS[model_type])
  return T5Config(**{**base, **sizes, **kwargs})


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> T5Config:
  """The config of a T5, mT5 or UMT5 ``config.json`` (transformers v4 or v5 keys).

  ``feed_forward_proj`` ``"gated-gelu"`` means tanh GELU, as in transformers. Output scaling:
  a v5 file states ``scale_decoder_outputs``; a v4 one ties it to ``tie_word_embeddings``
  (T5 v1.0 true, v1.1 false); mT5 never scales (transformers v5). Whether the output layer is
  tied is decided by the weights (:func:`fit_to_weights`): v5 writes ``tie_word_embeddings:
  true`` even over an untied ``lm_head``.

  Raises:
    ValueError: another model type, a missing key or an unknown activation, naming ``source``.
  """
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"{source}: model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}")

  def get(key: str, default: Any = dataclasses.MISSING) -> Any:
    if hf.get(key) is not None:
      return hf[key]
    if default is dataclasses.MISSING:
      raise ValueError(f"{source}: missing key {key!r} for model_type {model_type!r}")
    return default

  proj = get("feed_forward_proj", "relu" if model_type == "t5" else "gated-gelu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"{source}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]
  if act not in ACTIVATIONS:
    raise ValueError(f"{source}: activation {act!r} is not one of {sorted(ACTIVATIONS)}")
  tie = bool(get("tie_word_embeddings", True))
  scale = False if model_type == "mt5" else bool(get("scale_decoder_outputs", tie))
  layers = get("num_layers")
  rate = float(get("dropout_rate", 0.1))
  return T5Config(
    model_type=model_type,
    vocab_size=get("vocab_size"),
    hidden_size=get("d_model"),
    num_layers=layers,
    num_decoder_layers=get("num_decoder_layers", layers),
    num_heads=get("num_heads"),
    head_dim=get("d_kv"),
    intermediate_size=get("d_ff"),
    hidden_act=act,
    gated=parts[0] == "gated",
    relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
    relative_attention_max_distance=get("relative_attention_max_distance", 128),
    relative_bias_every_layer=model_type == "umt5",
    layer_norm_eps=float(get("layer_norm_epsilon", 1e-6)),
    hidden_dropout=rate,
    attention_dropout=rate,
    tie_word_embeddings=tie,
    scale_decoder_outputs=scale,
    pad_token_id=get("pad_token_id", 0),
    eos_token_id=_first(get("eos_token_id", 1)),
    decoder_start_token_id=get("decoder_start_token_id", get("pad_token_id", 0)),
    hf_config_json=json.dumps(dict(hf), sort_keys=True),
  )


def _first(token: int | list[int]) -> int:
  return token[0] if isinstance(token, list) else token


def config_to_hf(cfg: T5Config) -> dict[str, Any]:
  """A config.json: the one ``cfg`` was read from, updated with what decides shapes and maths."""
  hf = cfg.hf_config
  act = "gelu" if cfg.gated and cfg.hidden_act == "gelu_new" else cfg.hidden_act
  hf.update(
    model_type=cfg.model_type,
    vocab_size=cfg.vocab_size,
    d_model=cfg.hidden_size,
    num_layers=cfg.num_layers,
    num_decoder_layers=cfg.num_decoder_layers,
    num_heads=cfg.num_heads,
    d_kv=cfg.head_dim,
    d_ff=cfg.intermediate_size,
    feed_forward_proj=f"gated-{act}" if cfg.gated else act,
    relative_attention_num_buckets=cfg.relative_attention_num_buckets,
    relative_attention_max_distance=cfg.relative_attention_max_distance,
    layer_norm_epsilon=cfg.layer_norm_eps,
    tie_word_embeddings=cfg.tie_word_embeddings,
    pad_token_id=cfg.pad_token_id,
    eos_token_id=cfg.eos_token_id,
    decoder_start_token_id=cfg.decoder_start_token_id,
    is_encoder_decoder=True,
  )
  for derived in ("dense_act_fn", "is_gated_act"):  # transformers recomputes these.
    hf.pop(derived, None)
  if cfg.model_type != "mt5":
    hf["scale_decoder_outputs"] = cfg.scale_decoder_outputs
  table = ENCODER_ARCHITECTURES if cfg.encoder_only else ARCHITECTURES
  hf["architectures"] = [table[cfg.model_type]]
  return hf


# --- buckets -------------------------------------------------------------------------------------


def relative_buckets(
  relative: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
  """T5's bucket of each ``key position - query position`` (numpy, int32).

  Half the buckets hold exact distances, the other half log-spaced ones up to
  ``max_distance``; bidirectional buckets split by sign first, causal ones fold every future
  position into bucket 0. Computed in fp32 with transformers' operation order, so distances
  whose log ratio lands on an integer truncate the same way.
  """
  rel = np.asarray(relative, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  small = rel < max_exact
  ratio = np.log(np.where(small, 1, rel).astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(math.log(max_distance / max_exact))
  ratio = ratio * np.float32(num_buckets - max_exact)
  large = np.minimum(max_exact + ratio.astype(np.int64), num_buckets - 1)
  return (buckets + np.where(small, rel, large)).astype(np.int32)


def _square_buckets(cfg: T5Config, length: int, bidirectional: bool) -> np.ndarray:
  positions = np.arange(length)
  rel = positions[None, :] - positions[:, None]
  return relative_buckets(
    rel, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
  )


def _step_buckets(cfg: T5Config, length: int, index: Array) -> Array:
  """``[1, length]`` causal buckets of the query at ``index`` over the cache's positions."""
  table = relative_buckets(
    -np.arange(length),
    False,
    cfg.relative_attention_num_buckets,
    cfg.relative_attention_max_distance,
  )
  distance = jnp.clip(index - jnp.arange(length), 0, length - 1)
  return jnp.asarray(table)[distance][None, :]


# --- modules -------------------------------------------------------------------------------------


class _Block(nn.Module):
  """The fields of the layers' modules."""

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class RMSNorm(nn.Module):
  """T5's layer norm: ``weight * x / rms(x)``, no mean, no bias; the statistics in fp32."""

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(self.eps))
    return scale.astype(self.dtype) * y.astype(self.dtype)


def _projection(module: _Block, width: int, name: str, std: float, deterministic: bool):
  """A bias-free ``width``-output projection (LoRA when ``config.peft`` targets it), with
  transformers' T5 init (std scaled by the fan-in)."""
  return peft_layers.dense(
    module.config,
    width,
    name,
    deterministic,
    use_bias=False,
    dtype=module.dtype,
    param_dtype=module.param_dtype,
    kernel_init=nn.initializers.normal(std),
  )


class Attention(_Block):
  """T5 attention: bias-free q/k/v/o, unscaled scores, an optional relative position table.

  ``relative`` makes this module own ``relative_attention_bias`` and compute the position bias
  from ``buckets`` ([T, S] ints); otherwise ``position_bias`` (the first layer's, in T5) or
  none is used. Keys and values come from ``source`` (cross-attention), from ``x``, or from
  ``kv`` (a cached cross-attention's); ``cache`` ``(layer, index, beam_rows)`` writes the new
  self-attention keys/values first (and attends over beams' rows, research.models.common's
  ``attention``). ``kv_only`` returns the projected ``(keys, values)`` of ``source`` alone
  (``init_cache``). Returns ``(output, position bias, new layer cache)``.
  """

  relative: bool = False

  @nn.compact
  def __call__(
    self,
    x: Array | None,
    mask_bias: Array | None,
    deterministic: bool,
    *,
    source: Array | None = None,
    kv: tuple[Array, Array] | None = None,
    position_bias: Array | None = None,
    buckets: Any = None,
    cache: Any = None,
    kv_only: bool = False,
  ) -> Any:
    cfg = self.config
    h, d = cfg.num_heads, cfg.head_dim
    std = cfg.hidden_size**-0.5
    if kv is None:
      src = x if source is None else source
      k = _projection(self, h * d, "key", std, deterministic)(src)
      v = _projection(self, h * d, "value", std, deterministic)(src)
      k = k.reshape(*src.shape[:2], h, d)
      v = v.reshape(*src.shape[:2], h, d)
      if kv_only:  # The cache's heads-major layout.
        return to_heads_major(k), to_heads_major(v)
    else:
      k, v = kv
    b, t, _ = x.shape
    q = _projection(self, h * d, "query", (cfg.hidden_size * d) ** -0.5, deterministic)(x)
    q = q.reshape(b, t, h, d)
    new_cache = beam_rows = None
    if cache is not None:
      own, index, beam_rows = cache
      k, v, new_cache = write_kv_cache(own, index, k, v)
    if self.relative:
      table = nn.Embed(
        cfg.relative_attention_num_buckets,
        h,
        embedding_init=nn.initializers.normal(std),
        param_dtype=self.param_dtype,
        name="relative_attention_bias",
      )
      position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]
      position_bias = position_bias.astype(jnp.float32)
    bias = 0.0 if position_bias is None else position_bias
    if mask_bias is not None:
      bias = bias + mask_bias
    cached = cache is not None or kv is not None
    out = core.attend(
      self, q, k, v, bias, cfg.attention_dropout, deterministic, None, cached, beam_rows
    )
    out = _projection(self, cfg.hidden_size, "output", (h * d) ** -0.5, deterministic)(
      out.reshape(b, t, h * d)
    )
    return out, position_bias, new_cache


class FeedForward(_Block):
  """``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` (HF ``wi`` / ``wi_0``,
  ``wi_1``, ``wo``), with dropout before ``down``."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    act = ACTIVATIONS[cfg.hidden_act]
    d_in = cfg.hidden_size**-0.5
    up = _projection(self, cfg.intermediate_size, "up", d_in, deterministic)(x)
    if cfg.gated:
      gate = _projection(self, cfg.intermediate_size, "gate", d_in, deterministic)(x)
      h = act(gate) * up
    else:
      h = act(up)
    h = dropout(self, h, cfg.hidden_dropout, deterministic)
    return _projection(self, cfg.hidden_size, "down", cfg.intermediate_size**-0.5, deterministic)(h)


def _norm(module: _Block, name: str) -> RMSNorm:
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  return RMSNorm(module.config.layer_norm_eps, name=name, **kw)


def _adapt(module: _Block, h: Array, name: str, deterministic: bool) -> Array:
  """``dropout(h)`` of a sublayer's output, through the adapter ``name`` where
  ``peft.adapter_placement`` puts one (``ffn_adapter``; with Houlsby's also
  ``attention_adapter`` and ``cross_attention_adapter``, cross-attention being an attention
  sublayer). The caller adds it to the residual: T5's blocks are pre-norm, so the adapter sits
  where the BERT-like encoder's does, on the sublayer's output before the residual sum, and no
  norm follows. With ``up`` at zero the adapter is the identity, the base model exactly.
  """
  cfg = module.config
  h = dropout(module, h, cfg.hidden_dropout, deterministic)
  modules = cfg.peft.adapter_modules if cfg.peft is not None else ()
  if name.removeprefix("cross_") not in modules:
    return h
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  return peft_layers.Adapter(cfg.peft.adapter_size, name=name, **kw)(h)


def _owns_bias(cfg: T5Config, index: int) -> bool:
  return index == 0 or cfg.relative_bias_every_layer


class EncoderLayer(_Block):
  """``x + attn(norm(x))``, then ``x + ffn(norm(x))``; returns ``(x, position bias)``."""

  index: int = 0

  @nn.compact
  def __call__(
    self, x: Array, mask_bias: Array, position_bias: Any, buckets: Any, deterministic: bool
  ) -> tuple[Array, Array]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attention = Attention(cfg, relative=_owns_bias(cfg, self.index), name="attention", **kw)
    h, position_bias, _ = attention(
      _norm(self, "attention_norm")(x),
      mask_bias,
      deterministic,
      position_bias=position_bias,
      buckets=buckets,
    )
    x = x + _adapt(self, h, "attention_adapter", deterministic)
    h = FeedForward(cfg, name="ffn", **kw)(_norm(self, "ffn_norm")(x), deterministic)
    return x + _adapt(self, h, "ffn_adapter", deterministic), position_bias


class Embeddings(nn.Module):
  """The shared token table at ``embeddings/word_embeddings/embedding`` (N(0, 1) as in HF)."""

  vocab_size: int
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    return nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(1.0),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="word_embeddings",
    )(ids)


class T5Encoder(_Block):
  """The T5 encoder with the encoder interface (the family's ``encoder``).

  ``(input_ids, attention_mask, token_type_ids, *, deterministic, first_token_only)`` ->
  ``{'hidden_states': [B,T,D] (after the final norm), 'pooled': None}``; ``token_type_ids``
  and ``first_token_only`` are accepted and ignored. Heads pool with ``mean`` or ``first``.
  """

  remat: bool = False

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
    first_token_only: bool = False,
  ) -> dict[str, Any]:
    del token_type_ids, first_token_only
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = Embeddings(cfg.vocab_size, cfg.hidden_size, name="embeddings", **kw)(input_ids)
    x = dropout(self, x, cfg.hidden_dropout, deterministic)
    buckets = _square_buckets(cfg, input_ids.shape[1], bidirectional=True)
    mask_bias = core.key_bias(attention_mask)
    layer_type = nn.remat(EncoderLayer, static_argnums=(5,)) if self.remat else EncoderLayer
    position_bias = None
    for i in range(cfg.num_layers):
      layer = layer_type(cfg, index=i, name=f"layer_{i}", **kw)
      x, position_bias = layer(x, mask_bias, position_bias, buckets, deterministic)
      if cfg.relative_bias_every_layer:
        position_bias = None
    x = dropout(self, _norm(self, "final_norm")(x), cfg.hidden_dropout, deterministic)
    return {"hidden_states": x, "pooled": None}


class DecoderLayer(_Block):
  """Self-attention (causal), cross-attention over the memory, feed-forward; all pre-norm.

  Teacher forcing passes ``memory``; a decoding step passes ``kv`` (the cached cross keys and
  values) and ``cache`` ``(self layer cache, index, beam_rows or None)``; ``kv_only`` returns the
  cross keys/values
  of ``memory`` (``init_cache``). Returns ``(x, position bias, new self layer cache)``.
  """

  index: int = 0

  @nn.compact
  def __call__(
    self,
    x: Array | None,
    memory: Array | None,
    self_bias: Array | None,
    cross_bias: Array | None,
    position_bias: Any,
    buckets: Any,
    deterministic: bool,
    kv: Any = None,
    cache: Any = None,
    kv_only: bool = False,
  ) -> Any:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cross = Attention(cfg, name="cross_attention", **kw)
    if kv_only:
      return cross(None, None, deterministic, source=memory, kv_only=True)
    attention = Attention(cfg, relative=_owns_bias(cfg, self.index), name="attention", **kw)
    h, position_bias, cache = attention(
      _norm(self, "attention_norm")(x),
      self_bias,
      deterministic,
      position_bias=position_bias,
      buckets=buckets,
      cache=cache,
    )
    x = x + _adapt(self, h, "attention_adapter", deterministic)
    h, _, _ = cross(
      _norm(self, "cross_attention_norm")(x), cross_bias, deterministic, source=memory, kv=kv
    )
    x = x + _adapt(self, h, "cross_attention_adapter", deterministic)
    h = FeedForward(cfg, name="ffn", **kw)(_norm(self, "ffn_norm")(x), deterministic)
    return x + _adapt(self, h, "ffn_adapter", deterministic), position_bias, cache


class T5Decoder(_Block):
  """The decoder stack; the token table comes from the parent (stored under ``encoder/``).

  One compact call, three uses: teacher forcing (``memory``: final hidden states ``[B, T, D]``
  of the whole prefix), a decoding step (``cache`` and ``index``: hidden states ``[B, T, D]``
  of the tokens at ``index`` and the new cache) and ``kv_only`` (the cache's ``cross`` part:
  every layer's cross-attention keys/values of ``memory``).
  """

  remat: bool = False

  @nn.compact
  def __call__(
    self,
    ids: Array | None,
    table: Array | None,
    memory: Array | None,
    memory_mask: Array | None,
    mask: Array | None = None,
    deterministic: bool = True,
    *,
    cache: dict[str, Any] | None = None,
    index: Array | None = None,
    kv_only: bool = False,
    beam_rows: Array | None = None,
  ) -> Any:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer_type = DecoderLayer
    if self.remat and cache is None and not kv_only:
      layer_type = nn.remat(DecoderLayer, static_argnums=(7,))
    layers = [
      layer_type(cfg, index=i, name=f"layer_{i}", **kw) for i in range(cfg.num_decoder_layers)
    ]
    if kv_only:
      kv = [layer(None, memory, None, None, None, None, True, kv_only=True) for layer in layers]
      return tuple({"key": k, "value": v} for k, v in kv)
    x = jnp.take(table, ids, axis=0).astype(self.dtype)
    x = dropout(self, x, cfg.hidden_dropout, deterministic)
    cross_bias = core.key_bias(memory_mask)
    if cache is None:
      buckets = _square_buckets(cfg, ids.shape[1], bidirectional=False)
      self_bias = core.causal_bias(mask, ids.shape[1])
      caches = [None] * len(layers)
      kvs = [None] * len(layers)
    else:
      length = cache_length(cache["self"][0])
      buckets = _step_buckets(cfg, length, index)
      allowed = jnp.arange(length) <= index
      self_bias = jnp.where(allowed, 0.0, core.NEG).astype(jnp.float32)[None, None, None, :]
      caches = [(own, index, beam_rows) for own in cache["self"]]
      kvs = [(kv["key"], kv["value"]) for kv in cache["cross"]]
    position_bias, new = None, []
    for layer, own, kv in zip(layers, caches, kvs, strict=True):
      x, position_bias, own = layer(
        x, memory, self_bias, cross_bias, position_bias, buckets, deterministic, kv, own
      )
      new.append(own)
      if cfg.relative_bias_every_layer:
        position_bias = None
    x = dropout(self, _norm(self, "final_norm")(x), cfg.hidden_dropout, deterministic)
    if cache is None:
      return x
    return x, {"self": tuple(new), "cross": cache["cross"]}


class T5ForConditionalGeneration(_Block):
  """The whole T5 encoder-decoder (the family's ``seq2seq``); see encoder_decoder.core for the
  interface. Params ``{'encoder', 'decoder'}`` and, untied, ``{'lm_head': {'kernel'}}``."""

  remat: bool = False

  # Batch fields that research.train.steps.apply_model passes on as keyword arguments.
  DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask")

  def setup(self):
    cfg = self.config
    if cfg.encoder_only:
      raise ValueError(
        f"this {cfg.model_type} config has no decoder (an encoder-only checkpoint): use its "
        "encoder, not the seq2seq model"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    self.encoder = T5Encoder(cfg, **kw)
    self.decoder = T5Decoder(cfg, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(
        cfg.vocab_size,
        use_bias=False,
        kernel_init=nn.initializers.normal(1.0),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )

  def _table(self) -> Array:
    return self.encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]

  def _logits(self, hidden: Array) -> Array:
    cfg = self.config
    if cfg.scale_decoder_outputs:
      hidden = hidden * jnp.asarray(cfg.hidden_size**-0.5, hidden.dtype)
    if cfg.tie_word_embeddings:
      return (hidden @ self._table().astype(hidden.dtype).T).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    decoder_input_ids: Array | None = None,
    decoder_attention_mask: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Logits ``[B, T, V]`` (fp32) of the targets given ``decoder_input_ids`` (teacher forcing);
    without them a target of zeros as long as the source stands in (what ``init`` needs)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    memory = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    if decoder_input_ids is None:
      decoder_input_ids = jnp.zeros_like(input_ids)
    return self.decode(
      decoder_input_ids,
      memory,
      attention_mask,
      decoder_attention_mask,
      deterministic=deterministic,
    )

  def encode(
    self,
    input_ids: Array,
    attention_mask: Array,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Encoder hidden states ``[B, S, D]``."""
    out = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    return out["hidden_states"]

  def decode(
    self,
    decoder_input_ids: Array,
    memory: Array,
    attention_mask: Array,
    decoder_attention_mask: Array | None = None,
    *,
    deterministic: bool = True,
    task: str | None = None,
  ) -> Array:
    """Logits ``[B, T, V]`` of a whole target prefix given the encoder states (no cache)."""
    del task
    hidden = self.decoder(
      decoder_input_ids,
      self._table(),
      memory,
      attention_mask,
      decoder_attention_mask,
      deterministic,
    )
    return self._logits(hidden)

  def init_cache(self, memory: Array, max_length: int) -> dict[str, Any]:
    """The decoding cache: empty self-attention keys/values for ``max_length`` target
    positions, cross-attention keys/values projected from ``memory`` once."""
    cfg = self.config
    own = core.empty_self_cache(
      memory.shape[0], max_length, cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim, self.dtype
    )
    cross = self.decoder(None, None, memory, None, kv_only=True)
    return {"self": own, "cross": cross}

  def decode_step(
    self,
    ids: Array,
    index: Array,
    cache: dict[str, Any],
    attention_mask: Array,
    *,
    task: str | None = None,
    beam_rows: Array | None = None,
  ) -> tuple[Array, dict[str, Any]]:
    """Logits ``[B, V]`` for the position after ``ids [B]`` (at ``index``), and the new cache
    (``beam_rows``: research.models.common's ``attention``)."""
    del task
    hidden, cache = self.decoder(
      ids[:, None],
      self._table(),
      None,
      attention_mask,
      cache=cache,
      index=index,
      beam_rows=beam_rows,
    )
    return self._logits(hidden)[:, 0], cache


# --- HF names ------------------------------------------------------------------------------------


def _attention_names(ours: str, theirs: str, relative: bool) -> dict[str, str]:
  names = {f"{ours}/{p}/kernel": f"{theirs}.{h}.weight" for p, h in zip(_PROJ, "qkvo")}
  if relative:
    names[f"{ours}/relative_attention_bias/embedding"] = f"{theirs}.relative_attention_bias.weight"
  return names


_PROJ = ("query", "key", "value", "output")


def _stack_names(cfg: T5Config, side: str) -> dict[str, str]:
  layers = cfg.num_layers if side == "encoder" else cfg.num_decoder_layers
  ffn = {"gate": "wi_0", "up": "wi_1", "down": "wo"} if cfg.gated else {"up": "wi", "down": "wo"}
  names = {f"{side}/final_norm/scale": f"{side}.final_layer_norm.weight"}
  for i in range(layers):
    ours, theirs = f"{side}/layer_{i}", f"{side}.block.{i}.layer"
    names[f"{ours}/attention_norm/scale"] = f"{theirs}.0.layer_norm.weight"
    names.update(
      _attention_names(f"{ours}/attention", f"{theirs}.0.SelfAttention", _owns_bias(cfg, i))
    )
    f = 1
    if side == "decoder":
      names[f"{ours}/cross_attention_norm/scale"] = f"{theirs}.1.layer_norm.weight"
      names.update(
        _attention_names(f"{ours}/cross_attention", f"{theirs}.1.EncDecAttention", False)
      )
      f = 2
    names[f"{ours}/ffn_norm/scale"] = f"{theirs}.{f}.layer_norm.weight"
    for proj, hf in ffn.items():
      names[f"{ours}/ffn/{proj}/kernel"] = f"{theirs}.{f}.DenseReluDense.{hf}.weight"
  return names


def leaf_map(cfg: T5Config) -> dict[str, str]:
  """Our leaf path -> the ``*ForConditionalGeneration`` weight name (``shared.weight`` for the
  token table; no decoder or ``lm_head`` for an encoder-only config)."""
  names = {"encoder/embeddings/word_embeddings/embedding": SHARED, **_stack_names(cfg, "encoder")}
  if cfg.encoder_only:
    return names
  names.update(_stack_names(cfg, "decoder"))
  if not cfg.tie_word_embeddings:
    names["lm_head/kernel"] = LM_HEAD
  return names


def shared_aliases(hf_name: str) -> list[str]:
  """``shared.weight`` may be stored only under its tied aliases (``T5EncoderModel`` exports,
  older files): the encoder's or the decoder's ``embed_tokens``."""
  if hf_name == SHARED:
    return ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
  return []


def fit_to_weights(cfg: T5Config, available: Collection[str], names: Mapping[str, str]) -> T5Config:
  """``cfg`` as the weights have it: an untied output layer exactly when ``lm_head.weight`` is
  stored (transformers v5 writes ``tie_word_embeddings: true`` over untied heads and stores a
  tied one not at all), and encoder-only when no decoder weight is stored."""
  del names
  encoder_only = "decoder.final_layer_norm.weight" not in available
  return cfg.replace(tie_word_embeddings=LM_HEAD not in available, encoder_only=encoder_only)


# Megatron-style tensor parallelism (research.train.parallel) on T5's paths, as
# family.ENCODER_SHARDING on the shared encoder's: q/k/v of self- and cross-attention split over
# their output heads, the attention output over its input heads; the relative position table
# [buckets, heads] over heads (each device adds the bias of its own heads); the feed-forward's
# up/gate column-, its down row-parallel (no biases anywhere); the shared token table and an
# untied lm_head over the vocabulary. fsdp on the other dimension; RMS scales replicated.
SHARDING = (
  (r".*attention/(query|key|value)/kernel", ("fsdp", HEADS)),
  (r".*attention/output/kernel", (HEADS, "fsdp")),
  (r".*relative_attention_bias/embedding", (None, HEADS)),
  (r".*ffn/(up|gate)/kernel", ("fsdp", "tensor")),
  (r".*ffn/down/kernel", ("tensor", "fsdp")),
  (r".*word_embeddings/embedding", ("tensor", "fsdp")),
  (r".*lm_head/kernel", ("fsdp", "tensor")),
  *MATRIX_SHARDING,
)


FAMILY = Family(
  name="t5",
  config_type=T5Config,
  encoder=T5Encoder,
  seq2seq=T5ForConditionalGeneration,
  graft_rules=WHOLE_MODEL_RULES,
  sharding_rules=SHARDING,
  model_types=tuple(ARCHITECTURES),
  from_hf=config_from_hf,
  to_hf=config_to_hf,
  weight_names=leaf_map,
  legacy_names=shared_aliases,
  fit_to_weights=fit_to_weights,
  base_prefixes=("transformer.",),
  buffers=(
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
  ),
  tiny=tiny,
)

"""The BART architecture, in Flax linen: what BART, mBART and Marian run.

An encoder of self-attention layers, a decoder of causal self-, cross-attention and feed-forward
layers, token embeddings shared by both sides or not, and logits through the decoder's table (or
an untied ``lm_head``) plus ``final_logits_bias``. The families differ in data only, fields of
:class:`BartConfig` (research.models.encoder_decoder.bart reads them from config.json): learned
positions read at ``position + 2`` (BART, mBART) or fixed sinusoids (Marian); a LayerNorm after
the embeddings or not; post-LN blocks (BART, Marian) or pre-LN blocks with a final LayerNorm per
stack (mBART); embeddings scaled by ``sqrt(d_model)`` or not. Each operation follows
transformers' eager code, in its order, so fp32 results agree to ~1e-6.

Positions are column indices, as transformers numbers them: padding is expected on the right.
Masks, attention and the cache layout are research.models.encoder_decoder.core's, shared with
T5: :meth:`BartModel.init_cache` projects the cross-attention keys/values of the encoder states
once and allocates the self-attention buffers, :meth:`BartModel.decode_step` advances one token,
and ``core.generate`` drives them as transformers' ``generate`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
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

Array = jax.Array
Cache = dict[str, tuple[dict[str, Array], ...]]  # core's layout: {'self'|'cross': per layer}
LOGITS_BIAS = "final_logits_bias"


# Every family's ``tiny`` sizes (for tests).
TINY = dict(
  vocab_size=99,
  hidden_size=32,
  encoder_layers=2,
  decoder_layers=2,
  encoder_heads=4,
  decoder_heads=4,
  encoder_ffn_size=37,
  decoder_ffn_size=37,
  max_position_embeddings=64,
)


@dataclasses.dataclass(frozen=True)
class BartConfig:
  """Architecture of a BART-like encoder-decoder (hashable: it sits inside linen Modules).

  ``hidden_dropout`` is HF's ``dropout`` (embeddings and residual branches; what a run's
  ``model.dropout`` sets, with ``attention_dropout``), ``attention_dropout`` on the attention
  weights, ``activation_dropout`` inside the feed-forward block. ``logits_bias`` False leaves
  out ``final_logits_bias`` (base-model checkpoints have none; transformers then uses zeros).
  The token ids are what generation needs; ``hf_config_json`` keeps the source config.json so
  an export writes back what this config does not model. ``peft`` adds LoRA to the encoder's
  and decoder's q/k/v/output and FFN projections its targets name (``lora``), bottleneck
  adapters to every layer of both stacks (``adapters``, :class:`Layer`), or trains the biases
  (``bitfit``).
  """

  model_type: str = "bart"
  vocab_size: int = 50265
  decoder_vocab_size: int | None = None  # None: the encoder's vocabulary.
  hidden_size: int = 1024
  encoder_layers: int = 12
  decoder_layers: int = 12
  encoder_heads: int = 16
  decoder_heads: int = 16
  encoder_ffn_size: int = 4096
  decoder_ffn_size: int = 4096
  hidden_act: str = "gelu"
  max_position_embeddings: int = 1024
  positions: str = "learned"  # or "sinusoidal" (Marian)
  position_offset: int = 2  # Learned positions are read at position + 2.
  scale_embedding: bool = False  # Multiply token embeddings by sqrt(hidden_size).
  embedding_norm: bool = True
  pre_norm: bool = False  # mBART: pre-LN blocks and a final LayerNorm per stack.
  share_embeddings: bool = True
  tie_word_embeddings: bool = True
  logits_bias: bool = True
  layer_norm_eps: float = 1e-5
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  pad_token_id: int = 1
  bos_token_id: int | None = 0
  eos_token_id: int | None = 2
  decoder_start_token_id: int = 2
  forced_bos_token_id: int | None = None
  forced_eos_token_id: int | None = 2
  hf_config_json: str = "{}"
  peft: PeftConfig | None = None

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"activation {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.positions not in ("learned", "sinusoidal"):
      raise ValueError(f"positions {self.positions!r}: expected 'learned' or 'sinusoidal'")
    if self.share_embeddings and self.target_vocab_size != self.vocab_size:
      raise ValueError("shared embeddings need decoder_vocab_size == vocab_size")

  # The encoder interface's names (hf inspect, heads).
  @property
  def num_layers(self) -> int:
    return self.encoder_layers

  @property
  def num_heads(self) -> int:
    return self.encoder_heads

  @property
  def target_vocab_size(self) -> int:
    return self.decoder_vocab_size or self.vocab_size

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kwargs: Any) -> BartConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def tiny(cls, **kwargs: Any) -> BartConfig:
    """A 2+2-layer, 32-wide model for tests."""
    return cls(**{**TINY, **kwargs})


@dataclasses.dataclass(frozen=True)
class MBartConfig(BartConfig):
  """mBART: BART with pre-LN blocks and final LayerNorms (its own type, so its own family)."""

  model_type: str = "mbart"
  pre_norm: bool = True


@functools.lru_cache(maxsize=8)
def sinusoidal_positions(length: int, width: int) -> np.ndarray:
  """Marian's fixed position table ``[length, width]`` (fp32), as transformers builds it.

  Angles ``pos / 10000 ** (2 * (j // 2) / width)`` in float64; the sines of the even columns
  fill the first half, the cosines of the odd columns the second (not interleaved).
  """
  pos = np.arange(length, dtype=np.float64)[:, None]
  j = np.arange(width)
  angles = pos / np.power(10000, 2 * (j // 2) / width)
  half = (width + 1) // 2
  out = np.empty((length, width), np.float32)
  out[:, :half] = np.sin(angles[:, 0::2])
  out[:, half:] = np.cos(angles[:, 1::2])
  out.setflags(write=False)  # Cached: every caller shares this one array.
  return out


def _kw(module: nn.Module) -> dict[str, Any]:
  return dict(dtype=module.dtype, param_dtype=module.param_dtype)


def _dense(module: nn.Module, width: int, **kw: Any) -> nn.Dense:
  return nn.Dense(width, kernel_init=nn.initializers.normal(0.02), **_kw(module), **kw)


def _projection(module: nn.Module, width: int) -> nn.Module:
  """A layer's projection: ``nn.Dense``, or LoRA's when ``config.peft`` is LoRA (whether it
  gets the LoRA pair its path decides, research.models.peft_layers.module_path)."""
  init = nn.initializers.normal(0.02)
  return peft_layers.dense(module.config, width, None, True, kernel_init=init, **_kw(module))


def _project(dense: nn.Module, x: Array, deterministic: bool) -> Array:
  """``dense(x)``; a LoRA projection (built in ``setup``) learns ``deterministic`` here, for
  the dropout on its LoRA branch."""
  if isinstance(dense, peft_layers.LoraDense):
    return dense(x, deterministic)
  return dense(x)


def _norm(module: nn.Module) -> nn.LayerNorm:
  """A LayerNorm computed in fp32 (the caller casts back to the compute dtype)."""
  eps = module.config.layer_norm_eps
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=module.param_dtype)


class Embeddings(nn.Module):
  """Scaled token embeddings plus positions, then (BART, mBART) a LayerNorm and dropout.

  ``vocab_size`` None: no table of its own; the caller passes the shared one (the decoder).
  """

  config: BartConfig
  vocab_size: int | None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    init = dict(embedding_init=nn.initializers.normal(0.02), **_kw(self))
    if self.vocab_size is not None:
      self.word_embeddings = nn.Embed(self.vocab_size, cfg.hidden_size, **init)
    if cfg.positions == "learned":
      rows = cfg.max_position_embeddings + cfg.position_offset
      self.position_embeddings = nn.Embed(rows, cfg.hidden_size, **init)
    if cfg.embedding_norm:
      self.layer_norm = _norm(self)

  def table(self) -> Array:
    return self.word_embeddings.embedding

  def __call__(
    self, ids: Array, positions: Array, table: Array | None, deterministic: bool
  ) -> Array:
    cfg = self.config
    table = self.table() if table is None else table
    x = jnp.take(table, ids, axis=0).astype(self.dtype)
    if cfg.scale_embedding:
      x = x * np.float32(math.sqrt(cfg.hidden_size)).astype(self.dtype)
    if cfg.positions == "learned":
      x = x + self.position_embeddings(positions + cfg.position_offset)
    else:
      sinusoids = sinusoidal_positions(cfg.max_position_embeddings, cfg.hidden_size)
      x = x + jnp.take(jnp.asarray(sinusoids), positions, axis=0).astype(self.dtype)
    if cfg.embedding_norm:
      x = self.layer_norm(x).astype(self.dtype)
    return dropout(self, x, cfg.hidden_dropout, deterministic)


class Attention(nn.Module):
  """Multi-head attention with biased q/k/v/output projections (HF's ``q_proj``...).

  The key/value projection is a method of its own so decoding can project the encoder states
  once (cross-attention) or one new position at a time (self-attention).
  """

  config: BartConfig
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    width = self.config.hidden_size
    self.query, self.key, self.value = (_projection(self, width) for _ in range(3))
    self.output = _projection(self, width)

  def _heads(self, y: Array) -> Array:
    return y.reshape(*y.shape[:-1], self.num_heads, -1)

  def keys_values(self, source: Array, deterministic: bool = True) -> tuple[Array, Array]:
    """``(keys, values)`` ``[B, S, heads, head_dim]`` of ``source`` [B, S, D]."""
    k = _project(self.key, source, deterministic)
    return self._heads(k), self._heads(_project(self.value, source, deterministic))

  def __call__(
    self,
    x: Array,
    k: Array,
    v: Array,
    bias: Array,
    deterministic: bool,
    heads_major: bool = False,
    beam_rows: Array | None = None,
  ) -> Array:
    """Queries from ``x`` [B, T, D] over ``k``/``v`` (from the cache: ``heads_major``, and
    ``beam_rows``, research.models.common's ``attention``); ``bias`` broadcasts to [B, H, T, S].

    As transformers' eager attention: logits scaled after the product, fp32 softmax.
    """
    q = self._heads(_project(self.query, x, deterministic))
    rate, scale = self.config.attention_dropout, q.shape[-1] ** -0.5
    out = core.attend(self, q, k, v, bias, rate, deterministic, scale, heads_major, beam_rows)
    return _project(self.output, out.reshape(*x.shape[:-1], -1), deterministic)


class FeedForward(nn.Module):
  """``output(dropout(act(intermediate(x))))`` (HF's ``fc1``, ``fc2``)."""

  config: BartConfig
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.intermediate = _projection(self, self.width)
    self.output = _projection(self, self.config.hidden_size)

  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    h = ACTIVATIONS[cfg.hidden_act](_project(self.intermediate, x, deterministic))
    h = dropout(self, h, cfg.activation_dropout, deterministic)
    return _project(self.output, h, deterministic)


class Layer(nn.Module):
  """An encoder layer (self-attention, feed-forward) or, with ``cross``, a decoder layer
  (causal self-attention, cross-attention, feed-forward).

  Each block is ``norm(x + dropout(f(x)))`` (post-LN: BART, Marian) or ``x +
  dropout(f(norm(x)))`` (``pre_norm``: mBART); the norms keep their names either way.

  With adapters (``peft.method='adapters'``), ``ffn_adapter`` and, for the Houlsby placement,
  ``attention_adapter`` and (decoder) ``cross_attention_adapter`` transform a block's
  ``dropout(f(.))`` before the residual sum: post-LN ``norm(x + adapter(dropout(f(x))))``, as
  the BERT-like encoder places them (Houlsby et al.); pre-LN ``x + adapter(dropout(f(norm(x))))``,
  the same spot on the sublayer's output, since a pre-LN block has no norm after the sum. The
  cross-attention is an attention sublayer, so Houlsby adapts it too.
  """

  config: BartConfig
  cross: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    heads, width = (
      (cfg.decoder_heads, cfg.decoder_ffn_size)
      if self.cross
      else (cfg.encoder_heads, cfg.encoder_ffn_size)
    )
    self.attention = Attention(cfg, heads, **_kw(self))
    self.attention_norm = _norm(self)
    if self.cross:
      self.cross_attention = Attention(cfg, heads, **_kw(self))
      self.cross_attention_norm = _norm(self)
    self.ffn = FeedForward(cfg, width, **_kw(self))
    self.ffn_norm = _norm(self)
    modules = cfg.peft.adapter_modules if cfg.peft is not None else ()
    adapter = lambda: peft_layers.Adapter(cfg.peft.adapter_size, **_kw(self))
    if "attention_adapter" in modules:
      self.attention_adapter = adapter()
      if self.cross:
        self.cross_attention_adapter = adapter()
    if "ffn_adapter" in modules:
      self.ffn_adapter = adapter()

  def _block(
    self, x: Array, norm: nn.Module, f: Any, deterministic: bool, adapter: str
  ) -> tuple[Array, Any]:
    """One residual block around ``f`` (which returns ``(h, extra)``); returns ``(x, extra)``.
    The submodule named ``adapter``, when this layer has one, adapts the block's output."""
    cfg = self.config
    adapt = getattr(self, adapter) if hasattr(self, adapter) else lambda h: h
    if cfg.pre_norm:
      h, extra = f(norm(x).astype(self.dtype))
      return x + adapt(dropout(self, h, cfg.hidden_dropout, deterministic)), extra
    h, extra = f(x)
    h = adapt(dropout(self, h, cfg.hidden_dropout, deterministic))
    return norm(x + h).astype(self.dtype), extra

  def __call__(
    self,
    x: Array,
    bias: Array,
    deterministic: bool,
    memory: Array | None = None,
    memory_bias: Array | None = None,
    cache: tuple[dict[str, Array], dict[str, Array], Array, Array | None] | None = None,
  ) -> tuple[Array, dict[str, Array] | None]:
    """``x`` through the layer; returns ``(x, the updated self-attention cache or None)``.

    Teacher forcing: ``memory`` [B, S, D] (decoder). Decoding: ``cache`` is ``(this layer's
    self-attention buffers, its cross-attention keys/values, index, beam_rows or None)`` and
    ``x`` the new position(s), written into the buffers at ``index``.
    """

    def self_attention(h: Array) -> tuple[Array, Any]:
      k, v = self.attention.keys_values(h, deterministic)
      new = beam_rows = None
      if cache is not None:
        own, _, index, beam_rows = cache
        k, v, new = write_kv_cache(own, index, k, v)
      return self.attention(h, k, v, bias, deterministic, cache is not None, beam_rows), new

    x, new = self._block(x, self.attention_norm, self_attention, deterministic, "attention_adapter")
    if self.cross:

      def cross_attention(h: Array) -> tuple[Array, None]:
        if cache is None:
          k, v = self.cross_attention.keys_values(memory, deterministic)
        else:
          k, v = cache[1]["key"].astype(h.dtype), cache[1]["value"].astype(h.dtype)
        cached = cache is not None
        return self.cross_attention(h, k, v, memory_bias, deterministic, cached), None

      x, _ = self._block(
        x, self.cross_attention_norm, cross_attention, deterministic, "cross_attention_adapter"
      )
    ffn = lambda h: (self.ffn(h, deterministic), None)
    x, _ = self._block(x, self.ffn_norm, ffn, deterministic, "ffn_adapter")
    return x, new


def _layers(module: nn.Module, count: int, cross: bool) -> None:
  """Creates ``layer_0 .. layer_{count-1}`` in ``module``'s setup (rematerialised when
  ``module.remat``: teacher forcing only, decoding calls them with a cache and no backward)."""
  layer_type = nn.remat(Layer, static_argnums=(3,)) if module.remat else Layer
  for i in range(count):
    setattr(module, f"layer_{i}", layer_type(module.config, cross, **_kw(module)))


class BartEncoder(nn.Module):
  """The encoder, alone: the Family's ``encoder`` (the interface heads and TaskModel use).

  Returns ``{'hidden_states': [B,T,D], 'pooled': None}`` (heads pool themselves);
  ``token_type_ids`` is accepted and ignored (there are none), ``first_token_only`` returns
  position 0 alone.
  """

  config: BartConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.embeddings = Embeddings(cfg, cfg.vocab_size, **_kw(self))
    _layers(self, cfg.encoder_layers, cross=False)
    if cfg.pre_norm:
      self.final_norm = _norm(self)

  def table(self) -> Array:
    """The token table (shared with the decoder when ``share_embeddings``)."""
    return self.embeddings.table()

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
    first_token_only: bool = False,
  ) -> dict[str, Array | None]:
    del token_type_ids
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
    x = self.embeddings(input_ids, positions, None, deterministic)
    bias = core.key_bias(attention_mask)
    for i in range(cfg.encoder_layers):
      x, _ = getattr(self, f"layer_{i}")(x, bias, deterministic)
    if cfg.pre_norm:
      x = self.final_norm(x).astype(self.dtype)
    return {"hidden_states": x[:, :1] if first_token_only else x, "pooled": None}


class BartDecoder(nn.Module):
  """The decoder stack; its token table is its own or (shared) passed in by the parent."""

  config: BartConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    own = None if cfg.share_embeddings else cfg.target_vocab_size
    self.embeddings = Embeddings(cfg, own, **_kw(self))
    _layers(self, cfg.decoder_layers, cross=True)
    if cfg.pre_norm:
      self.final_norm = _norm(self)

  def _layer(self, i: int) -> Layer:
    return getattr(self, f"layer_{i}")

  def table(self, shared: Array | None) -> Array:
    return self.embeddings.table() if shared is None else shared

  def __call__(
    self,
    ids: Array,
    positions: Array,
    bias: Array,
    shared: Array | None,
    memory_bias: Array,
    deterministic: bool,
    memory: Array | None = None,
    cache: Cache | None = None,
    index: Array | None = None,
    beam_rows: Array | None = None,
  ) -> tuple[Array, tuple[dict[str, Array], ...] | None]:
    """Final hidden states of ``ids`` and, when decoding, the new self-attention buffers."""
    cfg = self.config
    x = self.embeddings(ids, positions, shared, deterministic)
    buffers = []
    for i in range(cfg.decoder_layers):
      if cache is None:
        layer_cache = None
      else:
        layer_cache = (cache["self"][i], cache["cross"][i], index, beam_rows)
      x, new = self._layer(i)(x, bias, deterministic, memory, memory_bias, layer_cache)
      buffers.append(new)
    if cfg.pre_norm:
      x = self.final_norm(x).astype(self.dtype)
    return x, (None if cache is None else tuple(buffers))

  def cross_keys_values(self, memory: Array) -> tuple[dict[str, Array], ...]:
    """Every layer's cross-attention keys/values of ``memory``: fixed for a source batch."""
    out = []
    for i in range(self.config.decoder_layers):
      k, v = self._layer(i).cross_attention.keys_values(memory)
      out.append({"key": to_heads_major(k), "value": to_heads_major(v)})
    return tuple(out)


class BartModel(nn.Module):
  """The full encoder-decoder (transformers' ``*ForConditionalGeneration``), with the
  interface of research.models.seq2seq.EncoderDecoder: ``__call__`` is teacher forcing
  (logits [B, T, V], fp32), ``encode`` / ``decode`` / ``init_cache`` / ``decode_step`` decode.
  """

  config: BartConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  # Batch fields that research.train.steps.apply_model passes on as keyword arguments.
  DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask")

  def setup(self):
    cfg = self.config
    kw = dict(remat=self.remat, **_kw(self))
    self.encoder = BartEncoder(cfg, **kw)
    self.decoder = BartDecoder(cfg, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = _dense(self, cfg.target_vocab_size, use_bias=False)
    if cfg.logits_bias:
      zeros = nn.initializers.zeros
      self.final_logits_bias = self.param(
        LOGITS_BIAS, zeros, (cfg.target_vocab_size,), self.param_dtype
      )

  def _shared(self) -> Array | None:
    return self.encoder.table() if self.config.share_embeddings else None

  def _logits(self, hidden: Array) -> Array:
    cfg = self.config
    if cfg.tie_word_embeddings:
      table = self.decoder.table(self._shared())
      logits = jnp.einsum("...d,vd->...v", hidden, table.astype(hidden.dtype))
    else:
      logits = self.lm_head(hidden)
    logits = logits.astype(jnp.float32)
    if cfg.logits_bias:
      logits = logits + self.final_logits_bias.astype(jnp.float32)
    return logits

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
    """Logits [B, T, V] of the targets given ``decoder_input_ids`` (teacher forcing).

    Without ``decoder_input_ids`` the decoder start token alone stands in (what ``init``
    needs).
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    memory = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    if decoder_input_ids is None:
      start = self.config.decoder_start_token_id
      decoder_input_ids = jnp.full((input_ids.shape[0], 1), start, jnp.int32)
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
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Encoder hidden states [B, S, D]."""
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
    """Logits [B, T, V] (fp32) of a whole target prefix given the encoder states, no cache
    (``task`` ignored, as in :meth:`decode_step`)."""
    del task
    if decoder_attention_mask is None:
      decoder_attention_mask = jnp.ones_like(decoder_input_ids)
    positions = jnp.arange(decoder_input_ids.shape[1], dtype=jnp.int32)[None]
    hidden, _ = self.decoder(
      decoder_input_ids,
      positions,
      core.causal_bias(decoder_attention_mask, decoder_input_ids.shape[1]),
      self._shared(),
      core.key_bias(attention_mask),
      deterministic,
      memory,
    )
    return self._logits(hidden)

  def init_cache(self, memory: Array, max_length: int) -> Cache:
    """Empty self-attention buffers for ``max_length`` target positions and the
    cross-attention keys/values of ``memory`` (research.models.encoder_decoder.core's layout)."""
    cfg = self.config
    heads, head_dim = cfg.decoder_heads, cfg.hidden_size // cfg.decoder_heads
    own = core.empty_self_cache(
      memory.shape[0], max_length, cfg.decoder_layers, heads, head_dim, memory.dtype
    )
    return {"self": own, "cross": self.decoder.cross_keys_values(memory)}

  def decode_step(
    self,
    ids: Array,
    index: Array,
    cache: Cache,
    attention_mask: Array,
    *,
    task: str | None = None,
    beam_rows: Array | None = None,
  ) -> tuple[Array, Cache]:
    """Logits [B, V] for the position after ``ids`` [B] (at ``index``), and the new cache.

    ``task`` is accepted and ignored (one LM head; research.models.decoding passes it);
    ``beam_rows``: research.models.common's ``attention``.
    """
    del task
    length = cache_length(cache["self"][0])  # Keys up to ``index`` are seen.
    bias = core.causal_bias(jnp.ones((1, length), jnp.int32), 1, index)
    positions = jnp.full((ids.shape[0], 1), index, jnp.int32)
    hidden, buffers = self.decoder(
      ids[:, None],
      positions,
      bias,
      self._shared(),
      core.key_bias(attention_mask),
      True,
      cache=cache,
      index=index,
      beam_rows=beam_rows,
    )
    return self._logits(hidden[:, 0]), {"self": buffers, "cross": cache["cross"]}

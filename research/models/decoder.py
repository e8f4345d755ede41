"""A Transformer decoder in Flax linen, shaped like the BERT encoder so BERT2BERT can warm-start it.

Each layer is post-LN like BERT: causal self-attention, then cross-attention over the encoder
states, then the feed-forward block, each followed by ``LayerNorm(x + dropout(h))``. The
parameter names mirror the encoder's (``decoder/layer_2/attention/query/kernel``,
``.../attention_norm``, ``.../ffn``, ``.../output_norm``, ``decoder/embeddings/...``) and add
``cross_attention`` and ``cross_attention_norm``, so a graft rule such as
``('decoder/layer_(\\d+)/(attention|ffn)/(.*)', r'encoder/layer_\\1/\\2/\\3')`` maps one onto
the other. The output projection is tied to ``decoder/embeddings/word_embeddings``.

Two paths share the parameters:

- teacher forcing (training, and decoding without a cache) runs the whole target sequence
  through ``research.models.encoder.SelfAttention`` with a causal mask (and ``kv=`` for the
  cross-attention), so it gets whatever the encoder's attention implementation does;
- incremental decoding runs one position at a time through :class:`DecoderAttention`, the same
  ``query/key/value/output`` parameters with the projections exposed, against a key/value cache:
  the self-attention keys/values of the positions decoded so far and the cross-attention
  keys/values of the encoder states, projected once per source batch.

Tests check that both paths give the same logits and tokens.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.common import (
  attention,
  cache_length,
  dense_init,
  empty_kv_cache,
  layer_norm,
  to_heads_major,
  write_kv_cache,
)
from research.models.config import EncoderConfig
from research.models.encoder import FeedForward, SelfAttention

Array = jax.Array
Dtype = Any
Cache = dict[str, list[dict[str, Array]]]  # {'self'|'cross': [{'key', 'value'}] per layer}


class DecoderEmbeddings(nn.Module):
  """Word + position (+ token type 0) embeddings and LayerNorm, with explicit positions.

  The parameter names are those of the encoder's Embeddings, so they can be grafted from it;
  positions are passed in because a decoding step embeds one token at position ``index``.
  ``attend`` is the tied output projection.
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    if cfg.embedding_size is not None:
      raise ValueError("the decoder does not support embedding_size != hidden_size (ELECTRA)")
    embed = lambda n: nn.Embed(
      n,
      cfg.hidden_size,
      embedding_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.word_embeddings = embed(cfg.vocab_size)
    self.position_embeddings = embed(cfg.max_position_embeddings)
    if cfg.type_vocab_size > 0:
      self.token_type_embeddings = embed(cfg.type_vocab_size)
    self.layer_norm = nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype
    )
    self.dropout = nn.Dropout(cfg.hidden_dropout)

  def __call__(self, ids: Array, positions: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    x = self.word_embeddings(ids)
    x = x + self.position_embeddings(positions + cfg.position_offset)
    if cfg.type_vocab_size > 0:
      x = x + self.token_type_embeddings(jnp.zeros_like(ids))
    x = self.layer_norm(x).astype(self.dtype)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, hidden: Array) -> Array:
    """Logits over the vocabulary: ``hidden @ word_embeddings.T`` (fp32)."""
    return self.word_embeddings.attend(hidden).astype(jnp.float32)


class DecoderAttention(nn.Module):
  """encoder.SelfAttention's parameters with the key/value projection exposed, for caching.

  The math is SelfAttention's (research.models.common's ``attention``: fp32 softmax, padding
  mask); no dropout (decoding only).
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    dense = lambda: nn.Dense(
      self.config.hidden_size,
      kernel_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.query, self.key, self.value, self.output = dense(), dense(), dense(), dense()

  def _split(self, t: Array) -> Array:
    return t.reshape(*t.shape[:-1], self.config.num_heads, self.config.head_dim)

  def project_kv(self, kv: Array) -> tuple[Array, Array]:
    """Keys and values ``[B, S, heads, head_dim]`` of ``kv`` ``[B, S, D]``."""
    return self._split(self.key(kv)), self._split(self.value(kv))

  def __call__(
    self, x: Array, k: Array, v: Array, mask: Array, beam_rows: Array | None = None
  ) -> Array:
    """Attends queries from ``x`` [B, T, D] to a cache's heads-major ``k``/``v`` [B, heads, S,
    head_dim]; ``mask`` is [B, 1|T, S]; ``beam_rows``: research.models.common's ``attention``."""
    q = self._split(self.query(x))
    mask = mask[:, None].astype(bool)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = attention(q, k, v, mask=mask, heads_major=True, beam_rows=beam_rows)
    return self.output(out.reshape(*out.shape[:-2], self.config.hidden_size))


class DecoderLayer(nn.Module):
  """Post-LN decoder layer: self-attention, cross-attention, feed-forward.

  ``mode`` picks the path: ``'full'`` (teacher forcing over [B, T]), ``'step'`` (one position;
  ``cache`` is this layer's ``(self, cross)`` key/value dicts; returns ``(x, new self dict)``)
  or ``'memory'`` (returns the cross-attention keys/values of ``memory``, the part of the cache
  that is fixed for a source batch).
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array | None,
    memory: Array | None,
    memory_mask: Array | None,
    self_mask: Array | None,
    deterministic: bool = True,
    *,
    mode: str = "full",
    cache: tuple[dict[str, Array], dict[str, Array]] | None = None,
    index: Array | None = None,
    beam_rows: Array | None = None,
  ):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda h: nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    norm = lambda h, name: layer_norm(h, cfg.layer_norm_eps, self.dtype, self.param_dtype, name)
    if mode == "memory":  # The cache's heads-major layout.
      k, v = DecoderAttention(cfg, name="cross_attention", **kw).project_kv(memory)
      return to_heads_major(k), to_heads_major(v)
    if mode == "full":
      h = SelfAttention(cfg, name="attention", **kw)(x, self_mask, deterministic)
      x = norm(x + drop(h), "attention_norm")
      h = SelfAttention(cfg, name="cross_attention", **kw)(x, memory_mask, deterministic, kv=memory)
      x = norm(x + drop(h), "cross_attention_norm")
    elif mode == "step":
      own, cross = cache
      attention = DecoderAttention(cfg, name="attention", **kw)
      keys, values, own = write_kv_cache(own, index, *attention.project_kv(x))
      seen = (jnp.arange(cache_length(own)) <= index)[None, None, :]
      x = norm(x + attention(x, keys, values, seen, beam_rows), "attention_norm")
      h = DecoderAttention(cfg, name="cross_attention", **kw)(
        x, cross["key"], cross["value"], memory_mask
      )
      x = norm(x + h, "cross_attention_norm")
      cache = own
    else:
      raise ValueError(f"DecoderLayer mode={mode!r}: expected full, step or memory")
    h = FeedForward(cfg, name="ffn", **kw)(x)
    x = norm(x + drop(h), "output_norm")
    return x if mode == "full" else (x, cache)


class Decoder(nn.Module):
  """The decoder stack: embeddings, ``num_layers`` DecoderLayers, tied output projection.

  Attributes:
    config: the architecture (an EncoderConfig: same fields as the encoder's, so BERT2BERT
      can copy the encoder into it).
    dtype / param_dtype: compute and storage dtypes.
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = DecoderEmbeddings(self.config, **kw)
    for i in range(self.config.num_layers):  # Named layer_i like the encoder's layers.
      setattr(self, f"layer_{i}", DecoderLayer(self.config, **kw))

  def _layers(self) -> list[DecoderLayer]:
    return [getattr(self, f"layer_{i}") for i in range(self.config.num_layers)]

  def __call__(
    self,
    ids: Array,
    memory: Array,
    memory_mask: Array,
    decoder_mask: Array | None = None,
    deterministic: bool = True,
  ) -> Array:
    """Hidden states [B, T, D] of the whole target prefix ``ids`` (teacher forcing).

    Args:
      ids: decoder input ids [B, T] (BOS first).
      memory: encoder hidden states [B, S, D].
      memory_mask: [B, S], 1 on real source tokens.
      decoder_mask: [B, T], 1 on real target tokens (None: all real).
      deterministic: no dropout.
    """
    t = ids.shape[1]
    x = self.embeddings(ids, jnp.arange(t)[None, :], deterministic)
    self_mask = jnp.tril(jnp.ones((t, t), jnp.int32))[None]
    if decoder_mask is not None:
      self_mask = self_mask * decoder_mask[:, None, :].astype(jnp.int32)
    cross_mask = memory_mask[:, None, :]
    for layer in self._layers():
      x = layer(x, memory, cross_mask, self_mask, deterministic)
    return x

  def init_cache(self, memory: Array, max_length: int) -> Cache:
    """An empty self-attention cache of ``max_length`` positions, and the cross keys/values.

    Returns ``{'self': [{'key', 'value'}] * layers, 'cross': [{'key', 'value'}] * layers}``,
    heads-major ``[B, heads, length, head_dim]`` (research.models.common's ``attention``);
    only the ``self`` part changes while decoding (the ``cross`` part is the same for every
    beam of a source).
    """
    cfg = self.config
    cache: Cache = {"self": [], "cross": []}
    for layer in self._layers():
      k, v = layer(None, memory, None, None, mode="memory")
      own = empty_kv_cache(memory.shape[0], max_length, cfg.num_heads, cfg.head_dim, k.dtype)
      cache["self"].append(own)
      cache["cross"].append({"key": k, "value": v})
    return cache

  def step(
    self,
    ids: Array,
    index: Array,
    cache: Cache,
    memory_mask: Array,
    beam_rows: Array | None = None,
  ) -> tuple[Array, Cache]:
    """Hidden state [B, D] of the token ``ids`` [B] at position ``index``, and the new cache
    (``beam_rows``: research.models.common's ``attention``)."""
    positions = jnp.full((ids.shape[0], 1), index, jnp.int32)
    x = self.embeddings(ids[:, None], positions, True)
    cross_mask = memory_mask[:, None, :]
    new_self = []
    for layer, own, cross in zip(self._layers(), cache["self"], cache["cross"], strict=True):
      x, own = layer(
        x, None, cross_mask, None, mode="step", cache=(own, cross), index=index, beam_rows=beam_rows
      )
      new_self.append(own)
    return x[:, 0], {"self": new_self, "cross": cache["cross"]}

  def logits(self, hidden: Array) -> Array:
    """The tied output projection (fp32); the LM head adds its bias."""
    return self.embeddings.attend(hidden)

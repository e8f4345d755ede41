"""A BERT-family Transformer encoder in Flax linen.

One implementation for BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA and MiniLM: learned
embeddings, post-LN layers, multi-head self-attention with a padding mask and an optional
tanh pooler. Parameter names follow the paths in DESIGN.md (``encoder/layer_3/attention/query/
kernel``); research.transfer.hf maps them to and from the HF names.

Precision: ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the weights, so
bf16 compute with fp32 master weights is ``dtype=bfloat16, param_dtype=float32``. LayerNorm
and the attention softmax always run in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.config import EncoderConfig

Array = jax.Array
Dtype = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def dense_init(std: float = 0.02) -> nn.initializers.Initializer:
  """BERT's truncated-normal-like init (HF uses a plain normal with std 0.02)."""
  return nn.initializers.normal(stddev=std)


def layer_norm(x: Array, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> Array:
  """LayerNorm computed in fp32 whatever the compute dtype, cast back to ``dtype``.

  Call it inside a compact method: the LayerNorm becomes a child of the calling module.
  """
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)(x)
  return y.astype(dtype)


class Embeddings(nn.Module):
  """Word + position (+ token type) embeddings, LayerNorm, dropout (+ ELECTRA projection)."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array | None, deterministic: bool) -> Array:
    cfg = self.config
    width = cfg.embedding_size or cfg.hidden_size
    embed = lambda n, name: nn.Embed(
      n,
      width,
      embedding_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids(input_ids, cfg))
    if cfg.type_vocab_size > 0:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = layer_norm(x, cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")
    x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    if cfg.embedding_size is not None:
      x = nn.Dense(
        cfg.hidden_size,
        kernel_init=dense_init(),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="projection",
      )(x)
    return x


def position_ids(input_ids: Array, cfg: EncoderConfig) -> Array:
  """Positions as HF computes them: 0.. for BERT; pad+1.. skipping padding for RoBERTa."""
  if cfg.family == "roberta":
    not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=-1) * not_pad + cfg.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)


class SelfAttention(nn.Module):
  """Multi-head attention with a key padding mask; fp32 softmax, dropout on the weights."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool, kv: Array | None = None) -> Array:
    """``mask`` is [B, 1|T, S] (1 = attend); ``kv`` switches to cross-attention."""
    cfg = self.config
    dense = lambda name: nn.Dense(
      cfg.hidden_size,
      kernel_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    kv = x if kv is None else kv
    split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, cfg.head_dim)
    q, k, v = split(dense("query")(x)), split(dense("key")(kv)), split(dense("value")(kv))
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(cfg.head_dim))
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask[:, None, :, :].astype(bool), logits, big_neg)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(cfg.attention_dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bnqk,bknh->bqnh", weights, v)
    return dense("output")(out.reshape(*out.shape[:-2], cfg.hidden_size))


class FeedForward(nn.Module):
  """The position-wise MLP: Dense(intermediate) -> activation -> Dense(hidden)."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kw = dict(kernel_init=dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(cfg.intermediate_size, name="intermediate", **kw)(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    return nn.Dense(cfg.hidden_size, name="output", **kw)(h)


class EncoderLayer(nn.Module):
  """Post-LN Transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda h: nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    norm = lambda h, name: layer_norm(h, cfg.layer_norm_eps, self.dtype, self.param_dtype, name)
    h = SelfAttention(cfg, name="attention", **kw)(x, mask, deterministic)
    x = norm(x + drop(h), "attention_norm")
    h = FeedForward(cfg, name="ffn", **kw)(x)
    return norm(x + drop(h), "output_norm")


class Encoder(nn.Module):
  """The encoder. Returns ``{'hidden_states': [B,T,D], 'pooled': [B,D] | None}``.

  Attributes:
    config: the architecture.
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    remat: recompute each layer in the backward pass (less memory, more compute).
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, Array | None]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = Embeddings(cfg, name="embeddings", **kw)(input_ids, token_type_ids, deterministic)
    mask = attention_mask[:, None, :]  # [B, 1, S]: every query sees the non-padded keys.
    layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, name=f"layer_{i}", **kw)(x, mask, deterministic)
    pooled = None
    if cfg.use_pooler:
      pooled = nn.Dense(cfg.hidden_size, kernel_init=dense_init(), name="pooler", **kw)(x[:, 0])
      pooled = jnp.tanh(pooled)
    return {"hidden_states": x, "pooled": pooled}

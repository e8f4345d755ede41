"""The Transformer encoder of the BERT-like family (and the base of MPNet's) in Flax linen.

One implementation for BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA and MiniLM: learned
embeddings, post-LN layers, multi-head self-attention with a padding mask and an optional
tanh pooler. Parameter names follow the paths in docs/design.md (``encoder/layer_3/attention/query/
kernel``); research.models.bert maps them to and from the HF names.

Precision: ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the weights, so
bf16 compute with fp32 master weights is ``dtype=bfloat16, param_dtype=float32``. LayerNorm
and the attention softmax always run in fp32.

Speed (what the train step spends its time on, measured on CPU and kept cheap everywhere):
query, key and value are one matmul against their concatenated kernels (the parameters stay
three ``Dense`` kernels); attention is research.models.common's ``attention``
(``jax.nn.dot_product_attention``: XLA's on CPU/TPU, cuDNN's fused kernel on a GPU in bf16).
GELU, dropout and the fp32 LayerNorm are shared with the decoder, the heads
and the PEFT layers through research.models.common, which says why they are cheap.

Parameter-efficient transfer (``config.peft``: the layers are research.models.peft_layers, the
rules research.transfer.peft) adds LoRA matrices to the projections its targets name (for the
fused q/k/v, a low-rank term per targeted slice) and residual adapters inside each layer;
without it the modules are exactly the plain ones.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import peft_layers
from research.models.common import ACTIVATIONS, attention, dense_init, dropout, layer_norm
from research.models.config import EncoderConfig

Array = jax.Array
Dtype = Any


class Embeddings(nn.Module):
  """Word + position (+ token type) embeddings, LayerNorm, dropout (+ ELECTRA projection)."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    token_type_ids: Array | None,
    deterministic: bool,
    positions: Array | None = None,
  ) -> Array:
    """``positions`` [B, T]: 0-based positions per example (packed rows restart them at each
    segment); the family's ``position_offset`` is added. None: :func:`position_ids`."""
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
    if positions is None:
      positions = position_ids(input_ids, cfg)
    else:
      positions = positions + cfg.position_offset
    x = x + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
    if cfg.type_vocab_size > 0:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = layer_norm(x, cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")
    x = dropout(self, x, cfg.hidden_dropout, deterministic)
    if cfg.embedding_size is not None:
      x = peft_layers.dense(
        cfg,
        cfg.hidden_size,
        "projection",
        deterministic,
        kernel_init=dense_init(),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )(x)
    return x


def position_ids(input_ids: Array, cfg: Any) -> Array:
  """Positions as HF computes them, from ``cfg.position_offset`` (see EncoderConfig).

  0: 0, 1, 2... whatever the token (BERT). Otherwise real tokens count from the offset and
  padding, the id ``offset - 1``, keeps ``offset - 1`` (RoBERTa: pad_token_id + 1; MPNet: 2).
  """
  if not cfg.position_offset:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
  pad = cfg.position_offset - 1
  not_pad = (input_ids != pad).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=-1) * not_pad + pad


class DenseParams(nn.Module):
  """The ``kernel`` and ``bias`` of an ``nn.Dense``, created exactly as it creates them.

  Lets a caller combine several projections into one matmul while each keeps its own
  parameter path (``attention/query/kernel``, ...), init and HF mapping. Under LoRA a targeted
  projection also returns its ``(lora_a, lora_b)``; otherwise the third item is None.
  """

  features: int
  param_dtype: Dtype = jnp.float32
  peft: Any = None

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array, tuple[Array, Array] | None]:
    shape = (in_features, self.features)
    kernel = self.param("kernel", dense_init(), shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return kernel, bias, peft_layers.lora_params(self, self.peft, shape, self.param_dtype)


class SelfAttention(nn.Module):
  """Multi-head attention with a key padding mask; fp32 softmax, dropout on the weights."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _project(self, x: Array, names: tuple[str, ...], deterministic: bool) -> list[Array]:
    """``x @ [W_a | W_b | ...] + [b_a | ...]`` as one matmul, split into [B, T, N, H] heads."""
    cfg = self.config
    dense = lambda n: DenseParams(cfg.hidden_size, self.param_dtype, cfg.peft, name=n)
    params = [dense(n)(x.shape[-1]) for n in names]
    kernel = jnp.concatenate([k for k, _, _ in params], axis=1).astype(self.dtype)
    bias = jnp.concatenate([b for _, b, _ in params]).astype(self.dtype)
    y = jnp.dot(x.astype(self.dtype), kernel) + bias
    lora = [(i, *pair) for i, (_, _, pair) in enumerate(params) if pair is not None]
    if lora:
      y = y + peft_layers.lora_delta(self, x, lora, len(names), cfg.peft, deterministic, self.dtype)
    y = y.reshape(*y.shape[:-1], len(names), cfg.num_heads, cfg.head_dim)
    return [y[..., i, :, :] for i in range(len(names))]

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array,
    deterministic: bool,
    kv: Array | None = None,
    position_bias: Array | None = None,
  ) -> Array:
    """``mask`` is [B, 1|T, S] (1 = attend); ``kv`` switches to cross-attention;
    ``position_bias`` [N, T, S] (fp32) is added to the logits (MPNet's relative positions)."""
    cfg = self.config
    if kv is None:
      q, k, v = self._project(x, ("query", "key", "value"), deterministic)
    else:
      (q,) = self._project(x, ("query",), deterministic)
      k, v = self._project(kv, ("key", "value"), deterministic)
    drop = None
    if cfg.attention_dropout and not deterministic:
      drop = lambda w: dropout(self, w, cfg.attention_dropout, deterministic)
    out = attention(
      q,
      k,
      v,
      mask=mask[:, None].astype(bool),
      bias=None if position_bias is None else position_bias[None],
      weights_dropout=drop,
    )
    out = out.reshape(*out.shape[:-2], cfg.hidden_size)
    return peft_layers.dense(
      cfg,
      cfg.hidden_size,
      "output",
      deterministic,
      kernel_init=dense_init(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(out)


class FeedForward(nn.Module):
  """The position-wise MLP: Dense(intermediate) -> activation -> Dense(hidden)."""

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """``deterministic`` only matters for LoRA dropout."""
    cfg = self.config
    kw = dict(kernel_init=dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    h = peft_layers.dense(cfg, cfg.intermediate_size, "intermediate", deterministic, **kw)(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    return peft_layers.dense(cfg, cfg.hidden_size, "output", deterministic, **kw)(h)


class EncoderLayer(nn.Module):
  """Post-LN Transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

  With adapters, ``attention_adapter`` (Houlsby placement) and ``ffn_adapter`` transform each
  sub-layer's output after its dropout, before the residual sum and LayerNorm (as Houlsby et
  al. place them). With ``first_only`` the layer computes position 0 alone (its query attends
  to every key): what a last layer owes a head that reads only the first token.
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array,
    deterministic: bool,
    first_only: bool = False,
    position_bias: Array | None = None,
  ) -> Array:
    """``position_bias`` [N, T, T]: added to every attention's logits (None: no bias)."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda h: dropout(self, h, cfg.hidden_dropout, deterministic)
    norm = lambda h, name: layer_norm(h, cfg.layer_norm_eps, self.dtype, self.param_dtype, name)
    attention = SelfAttention(cfg, name="attention", **kw)
    if first_only:
      bias = None if position_bias is None else position_bias[:, :1]
      h = attention(x[:, :1], mask, deterministic, kv=x, position_bias=bias)
      x = x[:, :1]
    else:
      h = attention(x, mask, deterministic, position_bias=position_bias)
    adapters = cfg.peft.adapter_modules if cfg.peft is not None else ()
    adapt = lambda h, name: (
      peft_layers.Adapter(cfg.peft.adapter_size, name=name, **kw)(h) if name in adapters else h
    )
    x = norm(x + adapt(drop(h), "attention_adapter"), "attention_norm")
    h = FeedForward(cfg, name="ffn", **kw)(x, deterministic)
    return norm(x + adapt(drop(h), "ffn_adapter"), "output_norm")


class Encoder(nn.Module):
  """The encoder. Returns ``{'hidden_states': [B,T,D], 'pooled': [B,D] | None}``.

  ``first_token_only=True`` is for callers that read only position 0 (a 'cls' or 'pooler'
  head): the last layer then computes that position alone and ``hidden_states`` is [B,1,D],
  which saves most of a layer (its FFN, output projection and T-1 queries).

  A Transformer family that differs in its embeddings or adds a bias to the attention logits
  subclasses this and overrides :meth:`embed` and :meth:`position_bias` (research.models.mpnet);
  the layers, the pooler and the parameter paths stay these.

  Attributes:
    config: the architecture.
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    remat: recompute each layer in the backward pass (less memory, more compute).
  """

  config: EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.nowrap
  def embed(
    self,
    input_ids: Array,
    token_type_ids: Array | None,
    deterministic: bool,
    positions: Array | None = None,
  ) -> Array:
    """The embedded tokens [B, T, D] (a submodule named ``embeddings``); ``positions``: see
    :class:`Embeddings`."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return Embeddings(self.config, name="embeddings", **kw)(
      input_ids, token_type_ids, deterministic, positions
    )

  @nn.nowrap
  def position_bias(self, length: int) -> Array | None:
    """A bias [N, T, T] added to every layer's attention logits; None here."""
    del length
    return None

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
    first_token_only: bool = False,
    segment_ids: Array | None = None,
    position_ids: Array | None = None,
  ) -> dict[str, Array | None]:
    """``segment_ids`` / ``position_ids`` [B, T] are a packed batch's (research.data.packing):
    a token attends only to keys of its own segment (> 0), positions restart per segment."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if position_ids is None:
      x = self.embed(input_ids, token_type_ids, deterministic)
    else:
      x = self.embed(input_ids, token_type_ids, deterministic, position_ids)
    bias = self.position_bias(input_ids.shape[-1])
    if segment_ids is None:
      mask = attention_mask[:, None, :]  # [B, 1, S]: every query sees the non-padded keys.
    else:  # [B, T, S]: a query sees the keys of its own example only.
      same = segment_ids[:, :, None] == segment_ids[:, None, :]
      mask = same & (segment_ids[:, None, :] > 0)
      first_token_only = False  # Each example's first token sits somewhere in the row.
    layer_cls = nn.remat(EncoderLayer, static_argnums=(3, 4)) if self.remat else EncoderLayer
    for i in range(cfg.num_layers):
      last = first_token_only and i == cfg.num_layers - 1
      x = layer_cls(cfg, name=f"layer_{i}", **kw)(x, mask, deterministic, last, bias)
    pooled = None
    if cfg.use_pooler:
      pooler = peft_layers.dense(
        cfg, cfg.hidden_size, "pooler", deterministic, kernel_init=dense_init(), **kw
      )
      pooled = jnp.tanh(pooler(x[:, 0]))
    return {"hidden_states": x, "pooled": pooled}

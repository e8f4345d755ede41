"""Numerics the decoder-only families share: RMSNorm, RoPE, causal masks, attention, names.

Each piece mirrors what transformers computes, operation for operation where the order changes
fp32 results (RMSNorm's cast before the weight in Llama but after it in Gemma; the rotary
frequencies computed in fp32 from ``theta ** (2i / d)``), so parity holds to ~1e-6.

Positions: transformers' plain forward numbers positions ``0..T-1`` whatever the padding (with
left padding, the first real token sits at position ``#pads``); its ``generate`` derives them from
the attention mask (``cumsum(mask) - 1``) so that left padding does not shift them. Both are here
(:func:`position_ids`): the forward's by default, the mask's when a config asks
(``position_ids_from_mask``), which makes left- and right-padded batches give equal features.

Projections: every kernel-and-bias layer is made by :func:`projection`, which is
research.models.peft_layers' ``dense``: with ``config.peft`` LoRA, a projection whose module path
matches ``lora_targets`` gets ``lora_a`` / ``lora_b`` beside its kernel, as in the BERT-like
encoder (one LoRA implementation; ``lora_b`` starts at zero, so the model starts as the base).
:func:`check_peft` refuses the methods the decoders do not build (adapters).

Decoding: :func:`init_cache` gives a key/value cache the modules fill (``cache=`` in, ``'cache'``
out, the attention mask spanning the whole cache), and :func:`greedy_generate` runs prefill
then one token per ``lax.scan`` step, as transformers' greedy ``generate``.

Forward: every family's model is a :class:`CausalLM`: :func:`prepare` (cache check, positions,
causal mask), the family's own embeddings, :func:`run_layers` (the ``layer_N`` stack, remat, the
cache) and its own final norm, then :func:`outputs` (the features dict, LM logits, the cache),
so the families differ only where their architectures do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models import peft_layers
from research.models.common import argmax, attention, cache_length, dropout, empty_kv_cache
from research.models.config import PeftConfig

Array = jax.Array
LM_HEAD = "lm_head.weight"  # The untied output layer of every *ForCausalLM / *LMHeadModel.
ROPE_TYPES = ("default", "linear", "llama3")
# Every decoder family's ``tiny`` sizes (for tests), kept in one place so they stay alike.
TINY = dict(
  vocab_size=99,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=37,
  max_position_embeddings=64,
)


def projection(
  module: nn.Module,
  cfg: Any,
  width: int,
  name: str,
  deterministic: bool = True,
  use_bias: bool = True,
) -> nn.Module:
  """A ``width``-output linear layer of ``module`` (call in compact): ``nn.Dense`` with the
  decoders' N(0, 0.02) init, or its LoRA twin when ``cfg.peft`` targets it."""
  return peft_layers.dense(
    cfg,
    width,
    name,
    deterministic,
    use_bias=use_bias,
    dtype=module.dtype,
    param_dtype=module.param_dtype,
    kernel_init=nn.initializers.normal(0.02),
  )


def check_peft(peft: PeftConfig | None, family: str) -> None:
  """Raises ValueError for a PEFT method the decoder families do not build (adapters: their
  layers have no adapter slots; LoRA, BitFit and none are supported)."""
  if peft is not None and peft.method == "adapters":
    raise ValueError(
      f"model.peft.method='adapters' is not implemented for the {family} family; "
      "use 'lora' or 'bitfit'"
    )


def position_ids(
  mask: Array, from_mask: bool, offset: Array | int = 0, length: int | None = None
) -> Array:
  """``[B, length]`` positions of the tokens at ``offset..offset+length-1`` of ``mask``'s columns:
  the column index (transformers' forward) or counted over real tokens.

  ``from_mask`` follows ``generate``: ``cumsum(mask) - 1`` with padded positions set to 1, so a
  left-padded row numbers its first real token 0, like the same row right-padded. ``offset``
  and ``length`` select the new tokens when decoding with a cache (``mask`` then spans it all).
  """
  b, t = mask.shape
  length = t if length is None else length
  if not from_mask:
    return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (b, length))
  counted = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
  counted = jnp.where(mask > 0, counted, 1)
  return jax.lax.dynamic_slice_in_dim(counted, offset, length, axis=1)


def causal_mask(mask: Array, offset: Array | int = 0, length: int | None = None) -> Array:
  """``[B, 1, length, S]`` boolean mask over the ``S`` keys of ``mask``: the query at column
  ``offset + i`` sees keys ``j <= offset + i`` that are not padding.

  A padded query (left padding: one with no real key before it) sees nothing and gets uniform
  weights (research.models.common's ``attention`` masks with a finite value) instead of NaNs;
  its output is padding and ignored downstream. A mask rather than ``is_causal``: with a cache
  the queries sit at ``offset``, and the padding has to be masked anyway.
  """
  s = mask.shape[-1]
  length = s if length is None else length
  queries = offset + jnp.arange(length, dtype=jnp.int32)
  causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= queries[:, None]
  return causal[None, None] & (mask[:, None, None, :] > 0)


def init_cache(cfg: Any, batch: int, length: int, dtype: Any = jnp.float32) -> dict[str, Any]:
  """An empty key/value cache for ``cfg``'s model: ``{'index': 0, 'layers': ({'key', 'value'}:
  [B, kv heads, length, head dim], ...)}`` (heads-major: research.models.common's ``attention``
  says why); ``length`` bounds prompt plus generated tokens."""
  layer = empty_kv_cache(batch, length, cfg.num_kv_heads, cfg.head_dim, dtype)
  return {"index": jnp.zeros((), jnp.int32), "layers": (layer,) * cfg.num_layers}


def prepare(
  cfg: Any,
  input_ids: Array,
  attention_mask: Array | None,
  positions: Array | None,
  cache: Any,
) -> tuple[Array | int, Array, Array]:
  """``(index, positions, mask)`` for a decoder call on ``input_ids``: every family starts its
  forward the same way, so the cache check, position numbering and mask live once.

  ``index`` is where the new tokens sit in the cache (0 without one); ``positions`` are the
  caller's or :func:`position_ids` per ``cfg.position_ids_from_mask``; ``mask`` is
  :func:`causal_mask` (the layers pass it to :func:`attend`). A missing ``attention_mask``
  means every token is real.

  Raises:
    ValueError: ``attention_mask`` does not span the whole ``cache``.
  """
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if cache is not None:
    check_cache(cache, attention_mask)
  index, length = (0 if cache is None else cache["index"]), input_ids.shape[1]
  if positions is None:
    positions = position_ids(attention_mask, cfg.position_ids_from_mask, index, length)
  return index, positions, causal_mask(attention_mask, index, length)


def run_layers(
  module: nn.Module,
  layer_type: type[nn.Module],
  x: Array,
  args: tuple[Array, ...],
  deterministic: bool,
  cache: Any,
  index: Array | int,
  indexed: bool = False,
) -> tuple[Array, Any]:
  """``x`` through ``layer_0 .. layer_{N-1}`` of ``layer_type`` (call in ``module``'s compact).

  Each layer is ``layer_type(config, [i,] name=f'layer_{i}', dtype, param_dtype)`` (``indexed``
  passes ``i``) called as ``(x, *args, deterministic, (layer cache, index) or None)`` and
  returning ``(x, layer cache)``. With ``module.remat`` the layers are rematerialised, except
  when decoding: that has no backward pass to save memory for. Returns ``x`` and the updated
  cache (None without one).
  """
  cfg = module.config
  if module.remat and cache is None:  # ``deterministic`` is static: it decides dropout.
    layer_type = nn.remat(layer_type, static_argnums=(len(args) + 2,))
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  layers = []
  for i in range(cfg.num_layers):
    layer = None if cache is None else (cache["layers"][i], index)
    first = (i,) if indexed else ()
    x, layer = layer_type(cfg, *first, name=f"layer_{i}", **kw)(x, *args, deterministic, layer)
    layers.append(layer)
  if cache is None:
    return x, None
  return x, {"index": index + x.shape[1], "layers": tuple(layers)}


def outputs(
  module: nn.Module, x: Array, embedding: Array, cache: Any, return_logits: bool
) -> dict[str, Any]:
  """The families' return value from the final-normed ``x``: ``{'hidden_states', 'pooled':
  None}`` (the encoder interface the heads read), plus ``'cache'`` when decoding and
  ``'logits'`` (:func:`lm_logits`) when asked."""
  out: dict[str, Any] = {"hidden_states": x, "pooled": None}
  if cache is not None:
    out["cache"] = cache
  logits = lm_logits(module, x, embedding, module.config, return_logits)
  if return_logits:
    out["logits"] = logits
  return out


class CausalLM(nn.Module):
  """A decoder-only LM with the encoder interface the heads use, plus LM logits on request.

  The forward every family shares: :func:`prepare`, the family's :meth:`embed`, the
  ``layer_N`` stack of :attr:`layer_type` (:func:`run_layers`), the family's :meth:`final_norm`
  and :func:`outputs`. A family subclasses it with its ``config`` type, its layer class and the
  two methods, so it states only where its architecture differs.

  Returns ``{'hidden_states': [B,T,D] (after the final norm), 'pooled': None}`` and, with
  ``return_logits``, ``'logits': [B,T,V]`` (fp32). ``token_type_ids`` and ``first_token_only``
  are accepted for the interface and ignored (every position feeds the next layer's keys).
  With a ``cache`` (:func:`init_cache`), ``input_ids`` are the next tokens, ``attention_mask``
  spans the whole cache, and ``'cache'`` is returned.
  """

  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  layer_type: ClassVar[type[nn.Module]]
  indexed_layers: ClassVar[bool] = False  # Whether a layer is built with its index (GPT-2).

  def embed(self, input_ids: Array, positions: Array, deterministic: bool) -> tuple[Array, Array]:
    """``(first hidden states, the word-embedding table)``; builds ``embeddings``."""
    raise NotImplementedError

  def layer_args(self, mask: Array, positions: Array) -> tuple[Array, ...]:
    """What every layer takes after ``x``: the causal mask and, for rotary layers, positions."""
    return mask, positions

  def final_norm(self, x: Array) -> Array:
    """The norm after the last layer; builds ``final_norm``."""
    raise NotImplementedError

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
    first_token_only: bool = False,
    position_ids: Array | None = None,
    return_logits: bool = False,
    cache: Any = None,
  ) -> dict[str, Any]:
    del token_type_ids, first_token_only
    index, positions, mask = prepare(self.config, input_ids, attention_mask, position_ids, cache)
    x, table = self.embed(input_ids, positions, deterministic)
    args = self.layer_args(mask, positions)
    x, cache = run_layers(
      self, self.layer_type, x, args, deterministic, cache, index, self.indexed_layers
    )
    return outputs(self, self.final_norm(x), table, cache, return_logits)


def check_cache(cache: Any, mask: Array) -> None:
  """Raises ValueError unless ``mask`` spans the whole cache (what decoding's mask needs)."""
  length = cache_length(cache["layers"][0]) if cache["layers"] else mask.shape[1]
  if mask.shape[1] != length:
    raise ValueError(
      f"decoding with a cache of {length} positions needs an attention_mask of {length} "
      f"columns (prompt and the tokens to come), got {mask.shape[1]}"
    )


def attend(
  module: nn.Module,
  q: Array,
  k: Array,
  v: Array,
  mask: Array,
  scale: float,
  rate: float,
  deterministic: bool,
  heads_major: bool = False,
) -> Array:
  """Softmax attention with grouped keys/values: ``q [B,T,H,D]``, ``k, v [B,S,K,D]`` (K | H;
  ``[B,K,S,D]`` from the cache: ``heads_major``), ``mask`` the boolean :func:`causal_mask` (an
  fp32 additive bias is accepted too).

  Each of the K key/value heads serves H/K query heads (grouped-query attention; K == H is
  plain multi-head), which ``jax.nn.dot_product_attention`` does natively, through
  research.models.common's ``attention``: logits and softmax in fp32, the weighted sum in the
  inputs' dtype; attention dropout at ``rate`` when not ``deterministic``.
  Returns ``[B, T, H, D]``.
  """
  drop = None
  if rate and not deterministic:
    drop = lambda w: dropout(module, w, rate, deterministic)
  masks = dict(mask=mask) if mask.dtype == jnp.bool_ else dict(bias=mask)
  v = v.astype(k.dtype)
  return attention(q, k, v, scale=scale, weights_dropout=drop, heads_major=heads_major, **masks)


class RMSNorm(nn.Module):
  """RMSNorm in fp32; ``offset=1`` is Gemma's ``(1 + weight)`` form (weight stored as in HF).

  Llama casts the normalised value back to the compute dtype before multiplying by the weight,
  Gemma multiplies in fp32 and casts after; both orders are kept so bf16 matches too.
  """

  eps: float
  offset: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(self.eps))
    if self.offset:
      return (y * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_from_hf(hf: Mapping[str, Any], source: str) -> tuple[float, str]:
  """``(theta, scaling as sorted JSON)`` from a config.json, v5 (``rope_parameters``) or v4.

  Raises:
    ValueError: a rope type not implemented here, naming ``source``.
  """
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = params or dict(hf.get("rope_scaling") or {})
  scaling.pop("rope_theta", None)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"{source}: rope type {kind!r} is not implemented; supported: {ROPE_TYPES}")
  scaling["rope_type"] = kind
  scaling.pop("type", None)
  return float(theta), json.dumps(scaling, sort_keys=True)


def rope_inv_freq(head_dim: int, theta: float, scaling_json: str) -> np.ndarray:
  """The rotary inverse frequencies ``[head_dim / 2]`` (fp32), with Llama-3 or linear scaling.

  Llama 3 divides low frequencies (wavelengths beyond ``original_max / low_freq_factor``) by
  ``factor``, keeps high ones, and interpolates smoothly between, as transformers'
  ``_compute_llama3_parameters``.
  """
  scaling = json.loads(scaling_json)
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = np.float32(scaling["factor"])
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates ``x [B,T,H,D]`` by its positions, in transformers' half-split (not interleaved)
  layout: ``x * cos + rotate_half(x) * sin`` with cos/sin computed in fp32, then cast."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def lm_logits(module: nn.Module, hidden: Array, embedding: Array, cfg: Any, want: bool) -> Array:
  """Vocabulary logits (fp32) from the final hidden states, through the tied embedding table or
  the untied ``lm_head`` (created at init even when ``want`` is False, so the tree is whole).

  Returns None when not ``want`` (classification never pays for the vocabulary matmul).
  """
  if cfg.tie_word_embeddings:
    return (hidden @ embedding.astype(hidden.dtype).T).astype(jnp.float32) if want else None
  if not cfg.lm_head:
    if want:
      raise ValueError("this model was loaded without its LM head (lm_head.weight was absent)")
    return None
  head = projection(module, cfg, cfg.vocab_size, "lm_head", use_bias=False)
  if want or module.is_initializing():
    out = head(hidden).astype(jnp.float32)
    return out if want else None
  return None


def greedy_generate(
  module: nn.Module,
  params: Any,
  input_ids: Array,
  attention_mask: Array,
  max_new_tokens: int,
  eos_token_id: int | None = None,
  pad_token_id: int = 0,
) -> Array:
  """``[B, max_new_tokens]`` greedy continuations, decoded with the key/value cache.

  As transformers' ``generate(do_sample=False)``: positions counted over real tokens (prompts
  should be left-padded so every row's last column is its last token), and once a row has
  produced ``eos_token_id`` it continues with ``pad_token_id``. Jit it with ``module`` and the
  ints static (``jax.jit(functools.partial(greedy_generate, module), static_argnums=...)``).
  """
  b, t = input_ids.shape
  new = jnp.ones((b, max_new_tokens), attention_mask.dtype)
  mask = jnp.concatenate([attention_mask, new], axis=1)
  positions = position_ids(mask, True)

  def run(ids: Array, cache: Any) -> tuple[Array, Any]:
    index = cache["index"]
    pos = jax.lax.dynamic_slice_in_dim(positions, index, ids.shape[1], axis=1)
    out = module.apply(
      {"params": params}, ids, mask, position_ids=pos, return_logits=True, cache=cache
    )
    return out["logits"][:, -1], out["cache"]

  logits, cache = run(input_ids, init_cache(module.config, b, t + max_new_tokens, module.dtype))

  def step(carry, _):
    logits, cache, done = carry
    token = argmax(logits)
    if eos_token_id is not None:
      token = jnp.where(done, pad_token_id, token)
      done = done | (token == eos_token_id)
    logits, cache = run(token[:, None], cache)
    return (logits, cache, done), token

  done = jnp.zeros((b,), bool)
  _, tokens = jax.lax.scan(step, (logits, cache, done), None, length=max_new_tokens)
  return tokens.T


# --- HF names ------------------------------------------------------------------------------------


def without_prefix(prefix: str) -> Callable[[str], list[str]]:
  """A ``legacy_names`` hook: ``prefix + name`` (a *ForCausalLM's, our canonical name) may be
  stored as the base model's plain ``name`` (``AutoModel`` exports; the original GPT-2)."""

  def names(hf_name: str) -> list[str]:
    return [hf_name[len(prefix) :]] if hf_name.startswith(prefix) else []

  return names


def fit_lm_head(cfg: Any, available: Collection[str], names: Mapping[str, str]) -> Any:
  """``cfg`` without the untied LM head when the checkpoint is a base model (no lm_head)."""
  del names
  if not cfg.tie_word_embeddings and cfg.lm_head and LM_HEAD not in available:
    return cfg.replace(lm_head=False)
  return cfg


def linear_kernels(linear: Callable[[str], bool]) -> Callable[[str, np.ndarray], np.ndarray]:
  """A tensor hook transposing the kernels of torch ``nn.Linear`` layers (``[out, in]``); GPT-2's
  ``Conv1D`` layers already store ``[in, out]``, our layout, so ``linear`` tells them apart."""

  def convert(path: str, value: np.ndarray) -> np.ndarray:
    if path.endswith("/kernel") and linear(path):
      return np.ascontiguousarray(value.T)
    return value

  return convert


def head_weights(cfg: Any, prefix_free: Mapping[str, str]) -> dict[str, str]:
  """The LM head's entry in a weight map, when the model has an untied one."""
  out = dict(prefix_free)
  if not cfg.tie_word_embeddings and cfg.lm_head:
    out["encoder/lm_head/kernel"] = LM_HEAD
  return out


class Embeddings(nn.Module):
  """The token table at ``embeddings/word_embeddings`` (the encoder's path for it), which the
  tied LM head reads back through :meth:`table`."""

  vocab_size: int
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.word_embeddings = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )

  def __call__(self, ids: Array) -> Array:
    return self.word_embeddings(ids)

  def table(self) -> Array:
    return self.word_embeddings.embedding

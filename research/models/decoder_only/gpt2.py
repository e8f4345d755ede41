"""GPT-2: learned absolute positions, LayerNorm, fused q/k/v, GELU (tanh) MLP, tied LM head.

HF's GPT-2 stores its projections as ``Conv1D`` layers, whose weights are ``[in, out]``: the
layout of our Dense kernels, so they load untransposed; only the (untied) ``lm_head``, a torch
``nn.Linear``, is transposed. Parameter paths: ``encoder/embeddings/{word,position}_embeddings/
embedding``, ``encoder/layer_N/attention_norm``, ``encoder/layer_N/attention/{qkv,output}``,
``encoder/layer_N/ffn_norm``, ``encoder/layer_N/ffn/{intermediate,output}``,
``encoder/final_norm``. HF names are GPT2LMHeadModel's (``transformer.h.N...``); the original
checkpoints' unprefixed base-model names (``h.N...``) load too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.common import ACTIVATIONS, dropout, layer_norm, write_kv_cache
from research.models.config import PeftConfig
from research.models.decoder_only import core
from research.models.family import MATRIX_SHARDING, Family

Array = jax.Array
PREFIX = "transformer."


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Architecture of a GPT-2 decoder (hashable: it sits inside linen Modules).

  ``hidden_dropout`` is HF's ``resid_pdrop``, ``attention_dropout`` ``attn_pdrop`` and
  ``embedding_dropout`` ``embd_pdrop``; ``lm_head`` False drops an untied output layer;
  ``peft`` adds LoRA to the projections its targets name (``encoder/layer_N/attention/qkv``,
  HF's fused ``c_attn``, as one projection the way peft wraps it; ``attention/output``,
  ``ffn/intermediate``, ``ffn/output``), None for the plain model.
  """

  model_type: str = "gpt2"
  vocab_size: int = 50257
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu_new"
  max_position_embeddings: int = 1024
  layer_norm_eps: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  lm_head: bool = True
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  embedding_dropout: float = 0.1
  pad_token_id: int = 0
  position_ids_from_mask: bool = False
  hf_config_json: str = "{}"
  peft: PeftConfig | None = None

  def __post_init__(self):
    core.check_peft(self.peft, "gpt2")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"activation {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads  # Plain multi-head attention (what a key/value cache is sized by).

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kwargs: Any) -> GPT2Config:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def tiny(cls, **kwargs: Any) -> GPT2Config:
    """A 2-layer, 32-wide GPT-2 for tests."""
    return cls(**{**core.TINY, **kwargs})


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> GPT2Config:
  """The config of a GPT-2 ``config.json``.

  Raises:
    ValueError: another model type or a missing key, naming ``source``.
  """
  if hf.get("model_type") != "gpt2":
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'gpt2'")

  def get(key: str, default: Any = dataclasses.MISSING) -> Any:
    if hf.get(key) is not None:
      return hf[key]
    if default is dataclasses.MISSING:
      raise ValueError(f"{source}: missing key {key!r} for model_type 'gpt2'")
    return default

  hidden = get("n_embd")
  return GPT2Config(
    vocab_size=get("vocab_size"),
    hidden_size=hidden,
    num_layers=get("n_layer"),
    num_heads=get("n_head"),
    intermediate_size=get("n_inner", 4 * hidden),
    hidden_act=get("activation_function", "gelu_new"),
    max_position_embeddings=get("n_positions"),
    layer_norm_eps=get("layer_norm_epsilon", 1e-5),
    scale_attn_weights=bool(get("scale_attn_weights", True)),
    scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", False)),
    tie_word_embeddings=bool(get("tie_word_embeddings", True)),
    hidden_dropout=float(get("resid_pdrop", 0.1)),
    attention_dropout=float(get("attn_pdrop", 0.1)),
    embedding_dropout=float(get("embd_pdrop", 0.1)),
    pad_token_id=get("pad_token_id", 0),
    hf_config_json=json.dumps(dict(hf), sort_keys=True),
  )


def config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
  """A config.json: the one ``cfg`` was read from, updated with the sizes that decide shapes."""
  hf = cfg.hf_config
  hf.update(
    model_type="gpt2",
    vocab_size=cfg.vocab_size,
    n_embd=cfg.hidden_size,
    n_layer=cfg.num_layers,
    n_head=cfg.num_heads,
    n_inner=cfg.intermediate_size,
    activation_function=cfg.hidden_act,
    n_positions=cfg.max_position_embeddings,
    layer_norm_epsilon=cfg.layer_norm_eps,
    tie_word_embeddings=cfg.tie_word_embeddings,
  )
  hf.setdefault("architectures", ["GPT2LMHeadModel"])
  return hf


class _GPT2Block(nn.Module):
  """The fields of layer ``index``'s modules (the index scales attention when
  ``scale_attn_by_inverse_layer_idx``)."""

  config: GPT2Config
  index: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class GPT2Attention(_GPT2Block):
  """Causal self-attention with one fused q/k/v projection (HF's ``c_attn``)."""

  @nn.compact
  def __call__(
    self, x: Array, bias: Array, deterministic: bool, cache: Any = None
  ) -> tuple[Array, Any]:
    """Returns the output and, given ``(layer cache, index)``, the updated layer cache."""
    cfg = self.config
    b, t, d = x.shape
    dense = lambda width, name: core.projection(self, cfg, width, name, deterministic)
    q, k, v = jnp.split(dense(3 * d, "qkv")(x), 3, axis=-1)
    shape = (b, t, cfg.num_heads, cfg.head_dim)
    scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= self.index + 1
    q, k, v = (y.reshape(shape) for y in (q, k, v))
    new_cache = None
    if cache is not None:
      k, v, new_cache = write_kv_cache(*cache, k, v)
    h = core.attend(
      self, q, k, v, bias, scale, cfg.attention_dropout, deterministic, cache is not None
    )
    return dense(d, "output")(h.reshape(b, t, d)), new_cache


class GPT2MLP(nn.Module):
  """``output(act(intermediate(x)))`` (HF's ``c_fc``, ``c_proj``)."""

  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    dense = lambda width, name: core.projection(self, cfg, width, name, deterministic)
    h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x))
    return dense(cfg.hidden_size, "output")(h)


class GPT2Layer(_GPT2Block):
  """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  @nn.compact
  def __call__(
    self, x: Array, bias: Array, deterministic: bool, cache: Any = None
  ) -> tuple[Array, Any]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(x, cfg.layer_norm_eps, self.dtype, self.param_dtype, "attention_norm")
    h, cache = GPT2Attention(cfg, self.index, name="attention", **kw)(h, bias, deterministic, cache)
    x = x + dropout(self, h, cfg.hidden_dropout, deterministic)
    h = layer_norm(x, cfg.layer_norm_eps, self.dtype, self.param_dtype, "ffn_norm")
    h = GPT2MLP(cfg, name="ffn", **kw)(h, deterministic)
    return x + dropout(self, h, cfg.hidden_dropout, deterministic), cache


class GPT2Model(core.CausalLM):
  """GPT-2 (:class:`~research.models.decoder_only.core.CausalLM`): learned positions added to
  the word embeddings, pre-LayerNorm blocks with a fused q/k/v projection, ``ln_f`` last."""

  config: GPT2Config
  layer_type: ClassVar[type[nn.Module]] = GPT2Layer
  indexed_layers: ClassVar[bool] = True  # scale_attn_by_inverse_layer_idx needs the index.

  def embed(self, input_ids: Array, positions: Array, deterministic: bool) -> tuple[Array, Array]:
    cfg = self.config
    embed = _GPT2Embeddings(cfg, name="embeddings", dtype=self.dtype, param_dtype=self.param_dtype)
    x = dropout(self, embed(input_ids, positions), cfg.embedding_dropout, deterministic)
    return x, embed.table()

  def layer_args(self, bias: Array, positions: Array) -> tuple[Array, ...]:
    return (bias,)  # Positions were added to the embeddings.

  def final_norm(self, x: Array) -> Array:
    cfg = self.config
    return layer_norm(x, cfg.layer_norm_eps, self.dtype, self.param_dtype, "final_norm")


class _GPT2Embeddings(nn.Module):
  """Word plus learned position embeddings (``embeddings/{word,position}_embeddings``)."""

  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(
      embedding_init=nn.initializers.normal(0.02), dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

  def __call__(self, ids: Array, positions: Array) -> Array:
    return self.word_embeddings(ids) + self.position_embeddings(positions)

  def table(self) -> Array:
    return self.word_embeddings.embedding


_LAYER = {
  "attention_norm": "ln_1",
  "attention/qkv": "attn.c_attn",
  "attention/output": "attn.c_proj",
  "ffn_norm": "ln_2",
  "ffn/intermediate": "mlp.c_fc",
  "ffn/output": "mlp.c_proj",
}


def leaf_map(cfg: GPT2Config) -> dict[str, str]:
  """Our leaf path -> the GPT2LMHeadModel weight name."""
  modules = {"final_norm": "transformer.ln_f"}
  for i in range(cfg.num_layers):
    for ours, theirs in _LAYER.items():
      modules[f"layer_{i}/{ours}"] = f"transformer.h.{i}.{theirs}"
  names = {
    "encoder/embeddings/word_embeddings/embedding": "transformer.wte.weight",
    "encoder/embeddings/position_embeddings/embedding": "transformer.wpe.weight",
  }
  for ours, theirs in modules.items():
    leaves = ("scale", "bias") if ours.endswith("norm") else ("kernel", "bias")
    for leaf in leaves:
      names[f"encoder/{ours}/{leaf}"] = f"{theirs}.{'bias' if leaf == 'bias' else 'weight'}"
  return core.head_weights(cfg, names)


# Conv1D weights are [in, out] already; only the nn.Linear LM head is transposed.
_TENSORS = core.linear_kernels(lambda path: path.startswith("encoder/lm_head/"))
# Tensor parallelism for the MLP and the (tied) word embeddings only. The fused qkv kernel
# [D, 3D] holds q | k | v side by side: a contiguous split of its output would give one device
# all of q and part of k, so every layer would move columns between devices. It and the
# attention output stay on fsdp alone (True); attention runs whole on each tensor device.
SHARDING = (
  (".*attention/(qkv|output)/kernel", True),
  (".*ffn/intermediate/kernel", ("fsdp", "tensor")),
  (".*ffn/intermediate/bias", ("tensor",)),
  (".*ffn/output/kernel", ("tensor", "fsdp")),
  (".*word_embeddings/embedding", ("tensor", "fsdp")),
  *MATRIX_SHARDING,
)

FAMILY = Family(
  name="gpt2",
  config_type=GPT2Config,
  encoder=GPT2Model,
  model_types=("gpt2",),
  from_hf=config_from_hf,
  to_hf=config_to_hf,
  weight_names=leaf_map,
  to_hf_tensor=_TENSORS,
  from_hf_tensor=_TENSORS,
  legacy_names=core.without_prefix(PREFIX),
  fit_to_weights=core.fit_lm_head,
  sharding_rules=SHARDING,
  tiny=GPT2Config.tiny,
)

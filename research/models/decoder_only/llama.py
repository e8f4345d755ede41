"""Llama, Qwen2 and Gemma: one pre-norm decoder with rotary positions, three families.

The three differ only in data, so one module (:class:`LlamaModel`) reads three config types
and this file builds three :class:`~research.models.family.Family` records:

- Llama: RMSNorm, SwiGLU MLP, rotary positions (with Llama-3 or linear ``rope_scaling``),
  grouped-query attention (``num_key_value_heads``), optional biases (``attention_bias``,
  ``mlp_bias``), tied or untied output layer;
- Qwen2: Llama with biases on q/k/v only (sliding-window attention is refused: unused by the
  released models' full-attention layers and not implemented);
- Gemma: the embedding scaled by ``sqrt(hidden)`` in the compute dtype, GeGLU (tanh GELU),
  RMSNorm with ``(1 + weight)``, ``head_dim`` independent of the width, output tied.

Parameter paths follow the encoder's names where the roles match, so rules carry over:
``encoder/embeddings/word_embeddings/embedding``, ``encoder/layer_N/attention_norm/scale``,
``encoder/layer_N/attention/{query,key,value,output}/kernel``, ``encoder/layer_N/ffn_norm/scale``,
``encoder/layer_N/ffn/{gate,up,down}/kernel``, ``encoder/final_norm/scale`` and, untied,
``encoder/lm_head/kernel``. HF names are the ``*ForCausalLM`` ones (``model.layers.N...``,
``lm_head.weight``); a base-model export (no ``model.`` prefix, no LM head) loads too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.common import ACTIVATIONS, dropout, write_kv_cache
from research.models.config import PeftConfig
from research.models.decoder_only import core
from research.models.family import HEADS, KV_HEADS, MATRIX_SHARDING, Family

Array = jax.Array
PREFIX = "model."


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-style decoder (hashable: it sits inside linen Modules).

  ``rope_scaling`` is the scaling dict as sorted JSON (a dict would not hash);
  ``attention_bias`` puts biases on q/k/v, ``output_bias`` on o; ``norm_offset`` 1 is Gemma's
  ``(1 + weight)`` RMSNorm; ``lm_head`` False drops an untied output layer (base checkpoints);
  ``peft`` adds LoRA to the projections its targets name (``encoder/layer_N/attention/
  {query,key,value,output}``, ``encoder/layer_N/ffn/{gate,up,down}``), None for the plain model.
  """

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  intermediate_size: int = 11008
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: str = '{"rope_type": "default"}'
  attention_bias: bool = False
  output_bias: bool = False
  mlp_bias: bool = False
  norm_offset: float = 0.0
  scale_embeddings: bool = False
  tie_word_embeddings: bool = False
  lm_head: bool = True
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  pad_token_id: int = 0
  position_ids_from_mask: bool = False
  hf_config_json: str = "{}"
  peft: PeftConfig | None = None

  def __post_init__(self):
    core.check_peft(self.peft, self.model_type)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kwargs: Any) -> LlamaConfig:
    return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
  """Qwen2: Llama with q/k/v biases."""

  model_type: str = "qwen2"
  attention_bias: bool = True


@dataclasses.dataclass(frozen=True)
class GemmaConfig(LlamaConfig):
  """Gemma: scaled embeddings, GeGLU, ``(1 + weight)`` RMSNorm, tied output."""

  model_type: str = "gemma"
  hidden_act: str = "gelu_pytorch_tanh"
  norm_offset: float = 1.0
  scale_embeddings: bool = True
  tie_word_embeddings: bool = True


CONFIG_TYPES: dict[str, type[LlamaConfig]] = {
  "llama": LlamaConfig,
  "qwen2": Qwen2Config,
  "gemma": GemmaConfig,
}
ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "gemma": "GemmaForCausalLM",
}


def config_from_hf(
  hf: Mapping[str, Any], source: str = "config.json", family: str | None = None
) -> LlamaConfig:
  """The config of a Llama, Qwen2 or Gemma ``config.json`` (transformers v4 or v5 keys).

  ``family`` is the family that reads the file (set by its record). When the run names that
  family (``model.family``) over a checkpoint of another type, as the CNN family does, the file
  gives only the sizes it shares with Llama's keys (``vocab_size``, ``hidden_size``,
  ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ...): a random model of
  ``family`` on that checkpoint's tokenizer, for scratch runs such as ``configs/sst2_llama.py:
  tiny``; its architecture-specific fields keep the family's defaults.

  Raises:
    ValueError: another model type when no family is given, a missing key, an unsupported rope
      type, or Qwen2's sliding-window attention, naming ``source``.
  """
  model_type = hf.get("model_type")
  foreign = model_type not in CONFIG_TYPES
  if foreign and family is None:
    raise ValueError(f"{source}: model_type {model_type!r} is not one of {sorted(CONFIG_TYPES)}")
  cls = CONFIG_TYPES[family if foreign else model_type]
  model_type = cls.model_type

  def get(key: str, default: Any = dataclasses.MISSING) -> Any:
    if hf.get(key) is not None:
      return hf[key]
    if default is dataclasses.MISSING:
      raise ValueError(f"{source}: missing key {key!r} for model_type {model_type!r}")
    return default

  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError(f"{source}: Qwen2 sliding-window attention is not implemented")
  hidden, heads = get("hidden_size"), get("num_attention_heads")
  theta, scaling = core.rope_from_hf(hf, source)
  act = cls.hidden_act if foreign else get("hidden_act", "silu")
  if model_type == "gemma" and not foreign:  # v4 names it hidden_activation (None: tanh GELU).
    act = hf.get("hidden_activation") or (act if "hidden_activation" not in hf else None)
    act = act or "gelu_pytorch_tanh"
  bias = bool(get("attention_bias", False))
  return cls(
    vocab_size=get("vocab_size"),
    hidden_size=hidden,
    num_layers=get("num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=get("num_key_value_heads", heads),
    head_dim=get("head_dim", hidden // heads),
    intermediate_size=get("intermediate_size"),
    hidden_act=act,
    max_position_embeddings=get("max_position_embeddings", 2048),
    rms_norm_eps=get("rms_norm_eps", 1e-6),
    rope_theta=theta,
    rope_scaling=scaling,
    attention_bias=True if model_type == "qwen2" else bias,
    output_bias=False if model_type == "qwen2" else bias,
    mlp_bias=bool(get("mlp_bias", False)),
    tie_word_embeddings=bool(get("tie_word_embeddings", cls.tie_word_embeddings)),
    attention_dropout=float(get("attention_dropout", 0.0)),
    pad_token_id=get("pad_token_id", 0),
    hf_config_json="{}" if foreign else json.dumps(dict(hf), sort_keys=True),
  )


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
  """A config.json: the one ``cfg`` was read from, updated with the sizes that decide shapes."""
  hf = cfg.hf_config
  hf.update(
    model_type=cfg.model_type,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    intermediate_size=cfg.intermediate_size,
    hidden_act=cfg.hidden_act,
    rms_norm_eps=cfg.rms_norm_eps,
    tie_word_embeddings=cfg.tie_word_embeddings,
  )
  hf.setdefault("max_position_embeddings", cfg.max_position_embeddings)
  if "rope_parameters" not in hf and "rope_theta" not in hf:
    hf["rope_parameters"] = {**json.loads(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
  hf.setdefault("architectures", [ARCHITECTURES[cfg.model_type]])
  return hf


def tiny(cls: type[LlamaConfig], **kwargs: Any) -> LlamaConfig:
  """A 2-layer, 32-wide model of ``cls`` (GQA: 4 query heads over 2 key/value heads)."""
  return cls(**{**core.TINY, "num_kv_heads": 2, "head_dim": 8, **kwargs})


class _Block(nn.Module):
  """The fields of a layer's modules."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class Attention(_Block):
  """Rotary grouped-query self-attention."""

  @nn.compact
  def __call__(
    self, x: Array, bias: Array, positions: Array, deterministic: bool, cache: Any = None
  ) -> tuple[Array, Any]:
    """Returns the output and, given ``(layer cache, index)``, the updated layer cache."""
    cfg = self.config
    b, t, _ = x.shape

    def dense(width: int, use_bias: bool, name: str) -> nn.Module:
      return core.projection(self, cfg, width, name, deterministic, use_bias)

    q = dense(cfg.num_heads * cfg.head_dim, cfg.attention_bias, "query")(x)
    k = dense(cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias, "key")(x)
    v = dense(cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias, "value")(x)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    inv_freq = core.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q, k = core.apply_rope(q, positions, inv_freq), core.apply_rope(k, positions, inv_freq)
    new_cache = None
    if cache is not None:
      k, v, new_cache = write_kv_cache(*cache, k, v)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    out = core.attend(
      self, q, k, v, bias, scale, cfg.attention_dropout, deterministic, cache is not None
    )
    return dense(cfg.hidden_size, cfg.output_bias, "output")(out.reshape(b, t, -1)), new_cache


class GatedMLP(_Block):
  """``down(act(gate(x)) * up(x))``: SwiGLU with SiLU, GeGLU with tanh GELU."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config

    def dense(width: int, name: str) -> nn.Module:
      return core.projection(self, cfg, width, name, deterministic, cfg.mlp_bias)

    gate = dense(cfg.intermediate_size, "gate")(x)
    up = dense(cfg.intermediate_size, "up")(x)
    return dense(cfg.hidden_size, "down")(ACTIVATIONS[cfg.hidden_act](gate) * up)


class LlamaLayer(_Block):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  @nn.compact
  def __call__(
    self, x: Array, bias: Array, positions: Array, deterministic: bool, cache: Any = None
  ) -> tuple[Array, Any]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, **kw)
    h = core.RMSNorm(**norm, name="attention_norm")(x)
    h, cache = Attention(cfg, name="attention", **kw)(h, bias, positions, deterministic, cache)
    x = x + dropout(self, h, cfg.hidden_dropout, deterministic)
    h = GatedMLP(cfg, name="ffn", **kw)(core.RMSNorm(**norm, name="ffn_norm")(x), deterministic)
    return x + dropout(self, h, cfg.hidden_dropout, deterministic), cache


class LlamaModel(core.CausalLM):
  """Llama, Qwen2 and Gemma (:class:`~research.models.decoder_only.core.CausalLM`): word
  embeddings (scaled by sqrt(hidden) in Gemma), pre-RMSNorm blocks with rotary attention and a
  gated MLP, a final RMSNorm."""

  config: LlamaConfig
  layer_type: ClassVar[type[nn.Module]] = LlamaLayer

  def embed(self, input_ids: Array, positions: Array, deterministic: bool) -> tuple[Array, Array]:
    del positions, deterministic  # Rotary positions enter each layer; no embedding dropout.
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = core.Embeddings(cfg.vocab_size, cfg.hidden_size, name="embeddings", **kw)
    x = embed(input_ids)
    if cfg.scale_embeddings:  # Gemma: sqrt(hidden) rounded to the compute dtype, as in HF.
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
    return x, embed.table()

  def final_norm(self, x: Array) -> Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return core.RMSNorm(cfg.rms_norm_eps, cfg.norm_offset, name="final_norm", **kw)(x)


def leaf_map(cfg: LlamaConfig) -> dict[str, str]:
  """Our leaf path -> the ``*ForCausalLM`` weight name."""
  names = {
    "encoder/embeddings/word_embeddings/embedding": "model.embed_tokens.weight",
    "encoder/final_norm/scale": "model.norm.weight",
  }
  biases = {"query": cfg.attention_bias, "key": cfg.attention_bias, "value": cfg.attention_bias}
  biases["output"] = cfg.output_bias
  for i in range(cfg.num_layers):
    ours, theirs = f"encoder/layer_{i}", f"model.layers.{i}"
    names[f"{ours}/attention_norm/scale"] = f"{theirs}.input_layernorm.weight"
    names[f"{ours}/ffn_norm/scale"] = f"{theirs}.post_attention_layernorm.weight"
    for proj, hf in zip(("query", "key", "value", "output"), "qkvo", strict=True):
      names[f"{ours}/attention/{proj}/kernel"] = f"{theirs}.self_attn.{hf}_proj.weight"
      if biases[proj]:
        names[f"{ours}/attention/{proj}/bias"] = f"{theirs}.self_attn.{hf}_proj.bias"
    for proj in ("gate", "up", "down"):
      names[f"{ours}/ffn/{proj}/kernel"] = f"{theirs}.mlp.{proj}_proj.weight"
      if cfg.mlp_bias:
        names[f"{ours}/ffn/{proj}/bias"] = f"{theirs}.mlp.{proj}_proj.bias"
  return core.head_weights(cfg, names)


# Megatron-style: q/k/v column-parallel over heads, the attention output row-parallel, gate/up
# column- and down row-parallel, embeddings and an untied LM head over the vocabulary. With GQA
# k/v are split only when the tensor axis divides num_kv_heads; otherwise they are replicated
# (each device projects all kv heads, a small matmul) while q, the output and the MLP stay split.
SHARDING = (
  (".*attention/query/kernel", ("fsdp", HEADS)),
  (".*attention/query/bias", (HEADS,)),
  (".*attention/(key|value)/kernel", ("fsdp", KV_HEADS)),
  (".*attention/(key|value)/bias", (KV_HEADS,)),
  (".*attention/output/kernel", (HEADS, "fsdp")),
  (".*ffn/(gate|up)/kernel", ("fsdp", "tensor")),
  (".*ffn/(gate|up)/bias", ("tensor",)),
  (".*ffn/down/kernel", ("tensor", "fsdp")),
  (".*word_embeddings/embedding", ("tensor", "fsdp")),
  (".*lm_head/kernel", ("fsdp", "tensor")),
  *MATRIX_SHARDING,
)


def _family(name: str) -> Family:
  cls = CONFIG_TYPES[name]
  return Family(
    name=name,
    config_type=cls,
    encoder=LlamaModel,
    model_types=(name,),
    from_hf=functools.partial(config_from_hf, family=name),
    to_hf=config_to_hf,
    weight_names=leaf_map,
    legacy_names=core.without_prefix(PREFIX),
    fit_to_weights=core.fit_lm_head,
    buffers=(),
    sharding_rules=SHARDING,
    tiny=lambda **kw: tiny(cls, **kw),
  )


LLAMA, QWEN2, GEMMA = _family("llama"), _family("qwen2"), _family("gemma")
FAMILIES = (LLAMA, QWEN2, GEMMA)

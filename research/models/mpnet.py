"""MPNet in Flax linen, and its HF checkpoint import/export (no torch).

MPNet (Song et al., 2020; all-mpnet-base-v2 is the strongest common sentence encoder) is the
BERT-family encoder of research.models.encoder with three differences, and this module adds only
those, reusing the encoder's primitives (fp32 LayerNorm, hashed dropout, exact GELU, the fused
q/k/v parameters, the FFN, LoRA through ``config.peft``):

- embeddings are word + position only (no token types); positions count from ``PADDING_IDX + 1``
  and skip padding, as in RoBERTa;
- every layer adds the same *relative position bias* to its attention logits: one learned
  ``[num_buckets, num_heads]`` table (``encoder/relative_attention_bias/embedding``, beside the
  layers) indexed by T5-style log-bucketed key-minus-query offsets;
- HF names differ (``attention.attn.q``, ``attention.LayerNorm``, ...).

The module has the interface of ``research.models.encoder.Encoder`` (same call signature, same
``{'hidden_states', 'pooled'}`` output, same parameter paths for the shared parts:
``layer_3/attention/query/kernel``, ``layer_3/ffn/output/bias``...), so graft, freeze and LoRA
rules written for BERT apply to it unchanged.

Parity with transformers is exact up to fp32 rounding: two HF details are mirrored on purpose
rather than "fixed": positions use padding index 1 whatever ``pad_token_id`` says, and the
bucketing always uses 32 buckets (HF's ``compute_position_bias`` default) even when the config's
``relative_attention_num_buckets`` (the table size) is larger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research import paths
from research.models import peft_layers
from research.models.encoder import DenseParams, FeedForward, dense_init, dropout, layer_norm

Array = jax.Array
Dtype = Any

PADDING_IDX = 1  # HF's MPNetEmbeddings hard-codes it for position ids.
BUCKETS = 32  # HF's compute_position_bias never passes the config's bucket count.
MAX_DISTANCE = 128
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.txt",
)
BASE_PREFIX = "mpnet."  # What MPNetFor* task models put in front of the base model's names.
BUFFERS = ("embeddings.position_ids",)  # Saved by old transformers; not a parameter.


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
  """Architecture of an MPNet encoder (hashable, so it can sit inside a linen Module).

  Field names follow EncoderConfig so the shared encoder pieces read them unchanged.
  """

  model_type: str = "mpnet"
  vocab_size: int = 30527
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 514
  layer_norm_eps: float = 1e-5
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 1
  relative_attention_num_buckets: int = 32
  use_pooler: bool = True
  # The original config.json, kept verbatim so export writes back what was read.
  hf_config_json: str = "{}"
  # Parameter-efficient transfer (research.transfer.peft); None for the plain encoder.
  peft: Any = None

  def __post_init__(self):
    if self.relative_attention_num_buckets < BUCKETS:
      raise ValueError(
        f"relative_attention_num_buckets={self.relative_attention_num_buckets}: MPNet (as HF "
        f"implements it) indexes {BUCKETS} buckets, the table needs at least that many rows"
      )

  @property
  def family(self) -> str:
    return "mpnet"

  @property
  def type_vocab_size(self) -> int:
    return 0  # No token-type embeddings (lets code written for EncoderConfig ask).

  @property
  def embedding_size(self) -> None:
    return None  # Embeddings are as wide as the hidden states (no ELECTRA-style projection).

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def replace(self, **kwargs: Any) -> MPNetConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = CONFIG) -> MPNetConfig:
    """Builds the config from a parsed HF ``config.json`` of ``model_type`` ``mpnet``.

    Raises:
      ValueError: another ``model_type`` or a missing key, naming ``source``.
    """
    if hf.get("model_type") != "mpnet":
      raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'mpnet'")

    def get(key: str, default: Any = dataclasses.MISSING) -> Any:
      if key in hf:
        return hf[key]
      if default is dataclasses.MISSING:
        raise ValueError(f"{source}: missing key {key!r} for model_type 'mpnet'")
      return default

    return cls(
      vocab_size=get("vocab_size"),
      hidden_size=get("hidden_size"),
      num_layers=get("num_hidden_layers"),
      num_heads=get("num_attention_heads"),
      intermediate_size=get("intermediate_size"),
      hidden_act=get("hidden_act", "gelu"),
      max_position_embeddings=get("max_position_embeddings"),
      layer_norm_eps=get("layer_norm_eps", 1e-12),  # transformers' MPNetConfig default.
      hidden_dropout=get("hidden_dropout_prob", 0.1),
      attention_dropout=get("attention_probs_dropout_prob", 0.1),
      pad_token_id=get("pad_token_id", 1),
      relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
      hf_config_json=json.dumps(dict(hf), sort_keys=True),
    )

  def to_hf(self) -> dict[str, Any]:
    """A config.json: the one this was read from, updated with our fields."""
    hf = self.hf_config
    hf.update(
      model_type="mpnet",
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      num_hidden_layers=self.num_layers,
      num_attention_heads=self.num_heads,
      intermediate_size=self.intermediate_size,
      hidden_act=self.hidden_act,
      max_position_embeddings=self.max_position_embeddings,
      layer_norm_eps=self.layer_norm_eps,
      hidden_dropout_prob=self.hidden_dropout,
      attention_probs_dropout_prob=self.attention_dropout,
      pad_token_id=self.pad_token_id,
      relative_attention_num_buckets=self.relative_attention_num_buckets,
    )
    hf.setdefault("architectures", ["MPNetModel"])
    return hf

  @classmethod
  def tiny(cls, **kwargs: Any) -> MPNetConfig:
    """A 2-layer, 32-wide MPNet for tests and smoke runs."""
    base = dict(
      vocab_size=128,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      intermediate_size=64,
      max_position_embeddings=64,
    )
    base.update(kwargs)
    return cls(**base)


def relative_position_bucket(relative_position: np.ndarray) -> np.ndarray:
  """HF's (T5-style, bidirectional) bucket of each ``key - query`` offset, in numpy.

  Half the buckets per direction; offsets below 8 get their own bucket, larger ones share
  log-spaced buckets up to ``MAX_DISTANCE``. Computed in float32 like transformers, so bucket
  edges fall exactly where theirs do. Shapes are static, so this runs once per trace.
  """
  n = -np.asarray(relative_position, np.int64)
  half = BUCKETS // 2
  ret = (n < 0).astype(np.int64) * half
  n = np.abs(n)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) at offset 0, which the exact branch keeps.
    scaled = (
      np.log(n.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(MAX_DISTANCE / max_exact))
      * np.float32(half - max_exact)
    )
  large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
  return ret + np.where(n < max_exact, n, np.minimum(large, half - 1))


def position_ids(input_ids: Array) -> Array:
  """RoBERTa-style positions: ``PADDING_IDX + 1`` onwards over real tokens, padding gets 1."""
  not_pad = (input_ids != PADDING_IDX).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=-1) * not_pad + PADDING_IDX


class MPNetEmbeddings(nn.Module):
  """Word + position embeddings, LayerNorm, dropout."""

  config: MPNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, deterministic: bool) -> Array:
    cfg = self.config
    kw = dict(embedding_init=dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **kw)(input_ids)
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", **kw)
    x = x + pos(position_ids(input_ids))
    x = layer_norm(x, cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")
    return dropout(self, x, cfg.hidden_dropout, deterministic)


class MPNetSelfAttention(nn.Module):
  """Multi-head attention whose logits get ``position_bias`` added before the padding mask."""

  config: MPNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _project(self, x: Array, names: tuple[str, ...], deterministic: bool) -> list[Array]:
    """One matmul against the concatenated kernels (as the encoder does), split into heads."""
    cfg = self.config
    params = [
      DenseParams(cfg.hidden_size, self.param_dtype, cfg.peft, name=n)(x.shape[-1]) for n in names
    ]
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
    self, x: Array, mask: Array, position_bias: Array, deterministic: bool, kv: Array | None = None
  ) -> Array:
    """``mask`` [B, 1, S] (1 = attend); ``position_bias`` [N, T, S] fp32; ``kv`` for T < S."""
    cfg = self.config
    if kv is None:
      q, k, v = self._project(x, ("query", "key", "value"), deterministic)
    else:
      (q,) = self._project(x, ("query",), deterministic)
      k, v = self._project(kv, ("key", "value"), deterministic)
    q = q * jnp.asarray(1.0 / math.sqrt(cfg.head_dim), q.dtype)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) + position_bias[None]
    # A large finite value (not -inf) keeps fully padded rows finite.
    bias = jnp.where(mask.astype(bool), 0.0, jnp.float32(-1e30))
    weights = jax.nn.softmax(logits + bias[:, None, :, :], axis=-1).astype(self.dtype)
    weights = dropout(self, weights, cfg.attention_dropout, deterministic)
    out = jnp.einsum("bnqk,bknh->bqnh", weights, v).reshape(*q.shape[:-2], cfg.hidden_size)
    kw = dict(kernel_init=dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    return peft_layers.dense(cfg, cfg.hidden_size, "output", deterministic, **kw)(out)


class MPNetLayer(nn.Module):
  """Post-LN layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)). ``first_only``: see Encoder."""

  config: MPNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    mask: Array,
    position_bias: Array,
    deterministic: bool,
    first_only: bool = False,
  ) -> Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda h: dropout(self, h, cfg.hidden_dropout, deterministic)
    norm = lambda h, name: layer_norm(h, cfg.layer_norm_eps, self.dtype, self.param_dtype, name)
    attention = MPNetSelfAttention(cfg, name="attention", **kw)
    if first_only:
      h = attention(x[:, :1], mask, position_bias[:, :1], deterministic, kv=x)
      x = x[:, :1]
    else:
      h = attention(x, mask, position_bias, deterministic)
    # Adapters (config.peft) sit where research.models.encoder.EncoderLayer puts them.
    adapters = cfg.peft.adapter_modules if cfg.peft is not None else ()
    adapt = lambda h, name: (
      peft_layers.Adapter(cfg.peft.adapter_size, name=name, **kw)(h) if name in adapters else h
    )
    x = norm(x + adapt(drop(h), "attention_adapter"), "attention_norm")
    h = FeedForward(cfg, name="ffn", **kw)(x, deterministic)
    return norm(x + adapt(drop(h), "ffn_adapter"), "output_norm")


class MPNetEncoder(nn.Module):
  """MPNet with Encoder's interface. Returns ``{'hidden_states': [B,T,D], 'pooled': [B,D]|None}``.

  Attributes:
    config: the architecture.
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    remat: recompute each layer in the backward pass.
  """

  config: MPNetConfig
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
    first_token_only: bool = False,
  ) -> dict[str, Array | None]:
    """``token_type_ids`` is accepted for Encoder's signature and ignored: MPNet has none."""
    del token_type_ids
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = MPNetEmbeddings(cfg, name="embeddings", **kw)(input_ids, deterministic)
    # One bias for all layers, from positions alone (HF ignores padding here too): [N, T, T].
    steps = np.arange(input_ids.shape[-1])
    buckets = relative_position_bucket(steps[None, :] - steps[:, None])
    table = nn.Embed(
      cfg.relative_attention_num_buckets,
      cfg.num_heads,
      embedding_init=dense_init(),
      dtype=jnp.float32,  # The bias joins the fp32 logits.
      param_dtype=self.param_dtype,
      name="relative_attention_bias",
    )
    position_bias = jnp.transpose(table(buckets), (2, 0, 1))
    mask = attention_mask[:, None, :]
    layer_cls = nn.remat(MPNetLayer, static_argnums=(4, 5)) if self.remat else MPNetLayer
    for i in range(cfg.num_layers):
      last = first_token_only and i == cfg.num_layers - 1
      x = layer_cls(cfg, name=f"layer_{i}", **kw)(x, mask, position_bias, deterministic, last)
    pooled = None
    if cfg.use_pooler:
      pooler = peft_layers.dense(
        cfg, cfg.hidden_size, "pooler", deterministic, kernel_init=dense_init(), **kw
      )
      pooled = jnp.tanh(pooler(x[:, 0]))
    return {"hidden_states": x, "pooled": pooled}


# --- HF names ------------------------------------------------------------------------------------

_LAYER = {
  "attention/query": "attention.attn.q",
  "attention/key": "attention.attn.k",
  "attention/value": "attention.attn.v",
  "attention/output": "attention.attn.o",
  "attention_norm": "attention.LayerNorm",
  "ffn/intermediate": "intermediate.dense",
  "ffn/output": "output.dense",
  "output_norm": "output.LayerNorm",
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def leaf_map(cfg: MPNetConfig) -> dict[str, str]:
  """Our full leaf path (``encoder/...``) -> the HF ``MPNetModel`` weight name."""
  modules = {
    "embeddings/word_embeddings": ("embeddings.word_embeddings", ("embedding",)),
    "embeddings/position_embeddings": ("embeddings.position_embeddings", ("embedding",)),
    "embeddings/layer_norm": ("embeddings.LayerNorm", ("scale", "bias")),
  }
  for i in range(cfg.num_layers):
    for ours, theirs in _LAYER.items():
      leaves = ("scale", "bias") if ours.endswith("_norm") else ("kernel", "bias")
      modules[f"layer_{i}/{ours}"] = (f"encoder.layer.{i}.{theirs}", leaves)
  if cfg.use_pooler:
    modules["pooler"] = ("pooler.dense", ("kernel", "bias"))
  modules["relative_attention_bias"] = ("encoder.relative_attention_bias", ("embedding",))
  return {
    f"encoder/{o}/{leaf}": f"{t}.{_LEAF[leaf]}" for o, (t, ls) in modules.items() for leaf in ls
  }


def to_hf(path: str, value: np.ndarray) -> np.ndarray:
  """Our leaf -> HF layout: Dense kernels are [in, out] here, [out, in] in torch."""
  return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


from_hf = to_hf  # The transpose is its own inverse.


# --- Checkpoint directories ----------------------------------------------------------------------


def load_config(directory: str | os.PathLike) -> MPNetConfig:
  """MPNetConfig from ``directory/config.json``.

  Raises:
    ValueError: no or invalid config.json, or not an MPNet one.
  """
  file = Path(directory) / CONFIG
  if not file.is_file():
    raise ValueError(f"{file}: not found; an HF checkpoint directory needs a config.json")
  try:
    return MPNetConfig.from_hf(json.loads(file.read_text()), source=str(file))
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e


def load_mpnet(
  directory: str | os.PathLike, *, dtype: Any = np.float32
) -> tuple[MPNetConfig, dict[str, Any]]:
  """Loads an HF MPNet checkpoint directory as ``(MPNetConfig, {'encoder': params})``.

  Reads ``config.json`` and ``model.safetensors`` with safetensors.numpy. Accepts a base model
  or an ``MPNetFor*`` task model (``mpnet.`` prefix); tensors outside the encoder are logged.

  Args:
    directory: the checkpoint directory.
    dtype: dtype of the returned float arrays.

  Raises:
    ValueError: missing or damaged files, a missing tensor, or a tensor whose shape does not fit
      config.json (naming the tensor and both shapes).
  """
  from safetensors.numpy import load_file

  directory = Path(directory)
  cfg = load_config(directory)
  file = directory / SAFETENSORS
  if not file.is_file():
    raise ValueError(f"{file}: not found (only single-file safetensors MPNet checkpoints)")
  try:
    raw = load_file(str(file))
  except Exception as e:  # safetensors raises its own types for damaged files.
    raise ValueError(f"{file}: cannot read safetensors ({e}); truncated or damaged?") from e
  prefix = BASE_PREFIX if f"{BASE_PREFIX}embeddings.word_embeddings.weight" in raw else ""
  raw = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)} if prefix else raw
  if "pooler.dense.weight" not in raw:
    logging.info("%s: no pooler weights; loading without a pooler", file)
    cfg = cfg.replace(use_pooler=False)
  names = leaf_map(cfg)
  missing = [prefix + theirs for theirs in names.values() if theirs not in raw]
  if missing:
    raise ValueError(
      f"{file}: {len(missing)} tensor(s) required by config.json are missing, first: {missing[0]!r}"
    )
  flat = {ours: from_hf(ours, raw.pop(theirs)).astype(dtype) for ours, theirs in names.items()}
  expected = paths.flatten({"encoder": jax.eval_shape(_init_fn(MPNetEncoder(cfg)))["params"]})
  for path, leaf in expected.items():
    if tuple(flat[path].shape) != tuple(leaf.shape):
      raise ValueError(
        f"{file}: tensor {prefix + names[path]!r} has shape {tuple(flat[path].shape)} but "
        f"config.json implies {tuple(leaf.shape)} for {path}"
      )
  unused = sorted(prefix + k for k in raw if k not in BUFFERS)
  if unused:
    logging.info("%s: %d tensor(s) outside the encoder left unused: %s", file, len(unused), unused)
  return cfg, paths.unflatten(flat)


def _init_fn(module: MPNetEncoder):
  return lambda: module.init(jax.random.key(0), jnp.full((1, 4), PADDING_IDX + 1, jnp.int32))


def export_mpnet(
  directory: str | os.PathLike,
  cfg: MPNetConfig,
  params: Mapping[str, Any],
  *,
  tokenizer_from: str | os.PathLike | None = None,
) -> Path:
  """Writes the encoder of ``params`` as an HF ``MPNetModel`` checkpoint (safetensors, fp32).

  Args:
    directory: output directory (created).
    cfg: the architecture.
    params: a tree holding ``'encoder'`` (a TaskModel tree is fine; heads are not saved).
    tokenizer_from: a checkpoint directory whose tokenizer files are copied along.

  Returns:
    The output directory.

  Raises:
    ValueError: leaves with no HF name (LoRA or adapters: merge or drop them first) or HF names
      with no leaf.
  """
  from safetensors.numpy import save_file

  directory = Path(directory)
  flat = paths.flatten({"encoder": params["encoder"]})
  names = leaf_map(cfg)
  extra, absent = sorted(set(flat) - set(names)), sorted(set(names) - set(flat))
  if extra or absent:
    raise ValueError(
      f"{directory}: params do not match an MPNetModel: no HF name for {extra[:3]}, missing "
      f"{absent[:3]} (merge LoRA with research.transfer.peft.merge_lora before exporting)"
    )
  tensors = {names[p]: to_hf(p, np.asarray(v, dtype=np.float32)) for p, v in flat.items()}
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / SAFETENSORS), metadata={"format": "pt"})
  (directory / CONFIG).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
  if tokenizer_from is not None:
    for name in TOKENIZER_FILES:
      if (Path(tokenizer_from) / name).is_file():
        shutil.copy2(Path(tokenizer_from) / name, directory / name)
  return directory

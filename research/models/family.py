"""The Family record: everything the rest of the code needs to know about one model family.

A family is an architecture and its ways of meeting the outside world: the Flax module, the
config dataclass, the translation between that config and an HF ``config.json``, the map
between our parameter paths and HF weight names, the graft rules a run uses by default and the
sharding rules of fully sharded data parallelism. Keeping them in one record, built in the
family's own module (research.models.bert, research.models.mpnet, research.models.cnn), means
the loaders, the exporter, the grafting and the model builders never branch on a family's name:
they look the family up (research.models.families) and call what it provides. Adding a family
is a new module and one line in the registry, not a hunt through ``if model_type == ...``.

This module sits at the bottom of research.models (only the standard library and numpy), so the
family modules can build their record without importing the registry that lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

Config = Any  # A family's frozen (hashable) config dataclass.
Rules = tuple[tuple[str, Any], ...]

# Every pretrained encoder leaf onto the same path: what the BERT-like families graft by default.
ENCODER_RULES: Rules = (("encoder/(.*)", r"encoder/\1"),)
# Every leaf onto the same path: what a pretrained encoder-decoder grafts by default (a seq2seq
# model takes all of it; a classifier on its encoder takes the encoder, the rest reported unused).
WHOLE_MODEL_RULES: Rules = (("(.*)", r"\1"),)
# Sharding rules (research.train.parallel.state_shardings): a rule's value is True (split the
# largest dimension the fsdp axis divides) or a spec with one entry per dimension.
# The default: split every matrix and embedding table over fsdp, replicate vectors.
MATRIX_SHARDING: Rules = ((".*kernel", True), (".*embedding", True))
# The tensor axis on a dimension of heads, only when it divides the heads (whole heads per device).
HEADS, KV_HEADS = "tensor:num_heads", "tensor:num_kv_heads"
# Megatron-style tensor parallelism for the shared Transformer layers (research.models.encoder:
# BERT-like, MPNet, the seq2seq decoder's self- and cross-attention). Kernels are [in, out]:
# q/k/v split over their output heads (column-parallel, their biases alike), the attention
# output over its input heads (row-parallel: its bias is added after the all-reduce, so it is
# replicated); the MLP's first layer column-, its second row-parallel; the word embeddings over
# the vocabulary. fsdp goes on the other dimension; anything else as MATRIX_SHARDING.
ENCODER_SHARDING: Rules = (
  (".*attention/(query|key|value)/kernel", ("fsdp", HEADS)),
  (".*attention/(query|key|value)/bias", (HEADS,)),
  (".*attention/output/kernel", (HEADS, "fsdp")),
  (".*ffn/intermediate/kernel", ("fsdp", "tensor")),
  (".*ffn/intermediate/bias", ("tensor",)),
  (".*ffn/output/kernel", ("tensor", "fsdp")),
  (".*word_embeddings/embedding", ("tensor", "fsdp")),
  *MATRIX_SHARDING,
)


def transpose_kernels(path: str, value: np.ndarray) -> np.ndarray:
  """Our leaf <-> HF tensor for linear layers: kernels are [in, out] here, [out, in] in torch.

  The transpose is its own inverse, so one function serves import and export.
  """
  return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_NORMS = ("layer_norm", "attention_norm", "output_norm")


def leaf_names(modules: Mapping[str, str]) -> dict[str, str]:
  """Full leaf paths (``encoder/...``) -> HF weight names, from ``{our module: HF module}``.

  For Transformer encoders built from research.models.encoder: a module's leaves follow from
  its name (LayerNorms ``scale``/``bias`` -> ``weight``/``bias``; embedding tables, whose names
  end in ``_embeddings`` or ``_bias``, ``embedding`` -> ``weight``; the rest ``kernel``/``bias``).
  """
  out = {}
  for ours, theirs in modules.items():
    last = ours.rsplit("/", 1)[-1]
    if last in _NORMS:
      leaves = ("scale", "bias")
    elif last.endswith(("_embeddings", "_bias")):
      leaves = ("embedding",)
    else:
      leaves = ("kernel", "bias")
    for leaf in leaves:
      out[f"encoder/{ours}/{leaf}"] = f"{theirs}.{_LEAF[leaf]}"
  return out


def no_legacy_names(hf_name: str) -> list[str]:
  """No older spellings of any weight name."""
  del hf_name
  return []


def drop_absent_pooler(cfg: Config, available: Collection[str], names: Mapping[str, str]) -> Config:
  """``cfg`` without its pooler when the weights hold none of the pooler's tensors.

  Sentence-transformers exports and ``*ForMaskedLM`` models often come without one; loading them
  then builds an encoder without a pooler instead of failing on the missing tensors.
  """
  pooler = [theirs for ours, theirs in names.items() if ours.startswith("encoder/pooler/")]
  if getattr(cfg, "use_pooler", False) and pooler and not any(n in available for n in pooler):
    return cfg.replace(use_pooler=False)
  return cfg


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family provides; built once in its module, looked up by the registry.

  Attributes:
    name: the family's name (``model.family`` in a run's config selects it by this name).
    config_type: the config dataclass (frozen: it sits inside linen Modules); has ``replace``.
    encoder: the encoder module class, called as ``encoder(cfg, dtype=, param_dtype=, remat=,
      name=)`` and applied as ``(input_ids, attention_mask, token_type_ids, *, deterministic,
      first_token_only)`` -> ``{'hidden_states': [B,T,D], 'pooled': [B,D] | None}``: the
      interface the heads, TaskModel, seq2seq and meta-learning rely on.
    model_types: the HF ``config.json`` ``model_type`` values this family reads. Empty for a
      family no HF checkpoint describes (the CNN): it is chosen by name only.
    from_hf: ``(parsed config.json, source file name) -> config``; raises ValueError naming
      the source. A family without HF weights may still read a config.json (the CNN takes its
      vocabulary and width from the checkpoint whose tokenizer and word vectors it uses).
    to_hf: ``config -> config.json dict`` for export; None when the family has no HF form.
    weight_names: ``config -> {our leaf path ('encoder/...'): HF base-model weight name}``;
      None when the family has no HF form.
    to_hf_tensor / from_hf_tensor: ``(our path, array) -> array`` layout conversions.
    legacy_names: older spellings of an HF weight name, tried when the name is absent.
    fit_to_weights: ``(config, available HF names, weight_names) -> config``: adapts optional
      parts (a pooler) to what a checkpoint holds.
    base_prefixes: prefixes HF task models put before the base model's names (``bert.``).
    buffers: HF tensors that are not parameters (ignored, not reported as unused).
    graft_rules: the graft rules a run uses when ``model.graft_rules`` is empty.
    sharding_rules: the ``parallel.fsdp_rules`` a run uses when it names none.
    tiny: ``(**overrides) -> config``: a small config for tests.
    seq2seq: the whole encoder-decoder module class of a pretrained encoder-decoder family
      (T5, BART), None for encoder-only and decoder-only families. Called as ``seq2seq(cfg,
      dtype=, param_dtype=, remat=)``, its params are ``{'encoder', 'decoder', ...}`` whose
      ``encoder`` subtree is exactly what ``encoder`` builds (a shared token table lives there
      once; an untied output layer at a top-level path such as ``lm_head/kernel``), so
      ``weight_names`` may map ``decoder/...`` and top-level paths too. Its interface is
      research.models.seq2seq.EncoderDecoder's with one LM head (``__call__`` -> logits,
      ``encode``, ``decode``, ``init_cache``, ``decode_step``); see
      research.models.encoder_decoder.core.
  """

  name: str
  config_type: type
  encoder: Callable[..., Any]
  model_types: tuple[str, ...] = ()
  from_hf: Callable[[Mapping[str, Any], str], Config] | None = None
  to_hf: Callable[[Config], dict[str, Any]] | None = None
  weight_names: Callable[[Config], dict[str, str]] | None = None
  to_hf_tensor: Callable[[str, np.ndarray], np.ndarray] = transpose_kernels
  from_hf_tensor: Callable[[str, np.ndarray], np.ndarray] = transpose_kernels
  legacy_names: Callable[[str], list[str]] = no_legacy_names
  fit_to_weights: Callable[[Config, Collection[str], Mapping[str, str]], Config] = (
    drop_absent_pooler
  )
  base_prefixes: tuple[str, ...] = ()
  buffers: tuple[str, ...] = ()
  graft_rules: Rules = ENCODER_RULES
  sharding_rules: Rules = MATRIX_SHARDING
  tiny: Callable[..., Config] | None = None
  seq2seq: Callable[..., Any] | None = None

  @property
  def has_hf_weights(self) -> bool:
    """Whether checkpoints of this family can be read from and written to HF layout."""
    return self.weight_names is not None and self.to_hf is not None

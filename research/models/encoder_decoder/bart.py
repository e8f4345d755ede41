"""BART and mBART as model families: their config, its config.json form and their HF names.

The architecture and its config (research.models.encoder_decoder.bart_modules) serve BART, mBART
and Marian (research.models.encoder_decoder.marian); they differ in data only, fields of
:class:`~research.models.encoder_decoder.bart_modules.BartConfig`:

- ``positions``: BART's and mBART's learned table read at ``position + 2`` (fairseq reserved
  the first two rows), Marian's fixed sinusoids (never stored in a checkpoint);
- ``embedding_norm``: a LayerNorm after the embeddings (BART, mBART; not Marian);
- ``pre_norm``: mBART normalises before each block and adds a final LayerNorm to both stacks;
  BART and Marian normalise after each residual sum;
- ``share_embeddings`` / ``decoder_vocab_size``: one token table for both sides, or (Marian) a
  decoder table of its own; ``tie_word_embeddings``: logits through the decoder's table or an
  untied ``lm_head``.

Parameter paths (the encoder alone, the Family's ``encoder``, builds exactly the ``encoder``
subtree, so a pretrained encoder grafts onto a classifier unchanged; ``BartModel``, the
Family's ``seq2seq``, builds the whole tree)::

  encoder/embeddings/{word_embeddings,position_embeddings}/embedding, encoder/embeddings/layer_norm
  encoder/layer_N/{attention/{query,key,value,output},attention_norm,ffn/{intermediate,output},
    ffn_norm}, encoder/final_norm (mBART)
  decoder/embeddings/... (no word table when shared), decoder/layer_N/... plus
    cross_attention, cross_attention_norm; decoder/final_norm (mBART)
  final_logits_bias [V], lm_head/kernel (untied only)

HF names are those of ``*ForConditionalGeneration`` (``model.encoder.layers.N.self_attn.q_proj``);
torch stores linear kernels ``[out, in]`` (transposed here) and ``final_logits_bias`` as ``[1, V]``.
Generation: ``core.generate`` with ``core.GenerationConfig.for_model(config)`` reads the
config's decoder start, pad, EOS and forced BOS/EOS tokens (research.models.encoder_decoder.core).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from research.models.encoder_decoder.bart_modules import (
  LOGITS_BIAS,
  BartConfig,
  BartEncoder,
  BartModel,
  MBartConfig,
)
from research.models.family import ENCODER_SHARDING, WHOLE_MODEL_RULES, Family

LM_HEAD = "lm_head.weight"


# --- config.json -----------------------------------------------------------------------------

# Our field -> the config.json key, for the fields every BART-like config.json spells alike.
HF_KEYS = {
  "vocab_size": "vocab_size",
  "hidden_size": "d_model",
  "encoder_layers": "encoder_layers",
  "decoder_layers": "decoder_layers",
  "encoder_heads": "encoder_attention_heads",
  "decoder_heads": "decoder_attention_heads",
  "encoder_ffn_size": "encoder_ffn_dim",
  "decoder_ffn_size": "decoder_ffn_dim",
  "hidden_act": "activation_function",
  "max_position_embeddings": "max_position_embeddings",
  "scale_embedding": "scale_embedding",
  "tie_word_embeddings": "tie_word_embeddings",
  "hidden_dropout": "dropout",
  "attention_dropout": "attention_dropout",
  "activation_dropout": "activation_dropout",
  "pad_token_id": "pad_token_id",
  "bos_token_id": "bos_token_id",
  "eos_token_id": "eos_token_id",
  "decoder_start_token_id": "decoder_start_token_id",
  "forced_bos_token_id": "forced_bos_token_id",
  "forced_eos_token_id": "forced_eos_token_id",
}
_REQUIRED = ("vocab_size", "hidden_size", "encoder_layers", "decoder_layers")


def fields_from_hf(
  hf: Mapping[str, Any], source: str, config_type: type[BartConfig]
) -> dict[str, Any]:
  """Our fields of a BART-like ``config.json``: those present, the rest at ``config_type``'s
  defaults (transformers' own defaults, which a config.json leaves out).

  Raises:
    ValueError: another model type or a missing size, naming ``source``.
  """
  expected = config_type.model_type
  if hf.get("model_type") != expected:
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not {expected!r}")
  missing = [HF_KEYS[f] for f in _REQUIRED if hf.get(HF_KEYS[f]) is None]
  if missing:
    raise ValueError(f"{source}: missing key {missing[0]!r} for model_type {expected!r}")
  out = {ours: hf[theirs] for ours, theirs in HF_KEYS.items() if hf.get(theirs) is not None}
  for key in ("bos_token_id", "forced_bos_token_id", "forced_eos_token_id"):
    if key in hf and hf[key] is None:
      out[key] = None  # An explicit null switches a default token off.
  for key in ("eos_token_id", "forced_eos_token_id"):
    if isinstance(out.get(key), list):  # generate accepts several; the first one ends a row.
      out[key] = out[key][0]
  if out.get("decoder_start_token_id") is None and out.get("bos_token_id") is not None:
    out["decoder_start_token_id"] = out["bos_token_id"]  # What generate starts from then.
  out["share_embeddings"] = bool(out.get("tie_word_embeddings", True))
  return dict(out, hf_config_json=json.dumps(dict(hf), sort_keys=True))


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> BartConfig:
  """The config of a BART ``config.json``.

  transformers 5 ties the encoder's, the decoder's and the output tables together only with
  ``tie_word_embeddings``; without it the three are separate tensors.

  Raises:
    ValueError: another model type or a missing key, naming ``source``.
  """
  return BartConfig(**fields_from_hf(hf, source, BartConfig))


def mbart_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> MBartConfig:
  """The config of an mBART ``config.json`` (its fairseq flags ``normalize_before`` and
  ``add_final_layer_norm`` are ignored, as transformers ignores them: mBART is always pre-LN).

  Raises:
    ValueError: another model type or a missing key, naming ``source``.
  """
  return MBartConfig(**fields_from_hf(hf, source, MBartConfig))


def hf_fields(cfg: BartConfig, architecture: str) -> dict[str, Any]:
  """A config.json: the one ``cfg`` was read from, updated with every field modelled here."""
  hf = cfg.hf_config
  hf.update({theirs: getattr(cfg, ours) for ours, theirs in HF_KEYS.items()})
  hf["model_type"] = cfg.model_type
  hf["is_encoder_decoder"] = True
  hf.setdefault("architectures", [architecture])
  return hf


def config_to_hf(cfg: BartConfig) -> dict[str, Any]:
  """A BART or mBART config.json (:func:`hf_fields`).

  Raises:
    ValueError: tables shared but not tied or the reverse: transformers' BART ties both or
      neither, so such a model has no BART checkpoint.
  """
  if cfg.share_embeddings != cfg.tie_word_embeddings:
    raise ValueError(
      f"{cfg.model_type}: share_embeddings={cfg.share_embeddings} with tie_word_embeddings="
      f"{cfg.tie_word_embeddings} has no HF form (transformers ties both or neither)"
    )
  return hf_fields(cfg, f"{type(cfg).__name__.removesuffix('Config')}ForConditionalGeneration")


# --- HF names --------------------------------------------------------------------------------

_LAYER = {
  "attention/query": "self_attn.q_proj",
  "attention/key": "self_attn.k_proj",
  "attention/value": "self_attn.v_proj",
  "attention/output": "self_attn.out_proj",
  "attention_norm": "self_attn_layer_norm",
  "ffn/intermediate": "fc1",
  "ffn/output": "fc2",
  "ffn_norm": "final_layer_norm",
}
_CROSS = {
  "cross_attention/query": "encoder_attn.q_proj",
  "cross_attention/key": "encoder_attn.k_proj",
  "cross_attention/value": "encoder_attn.v_proj",
  "cross_attention/output": "encoder_attn.out_proj",
  "cross_attention_norm": "encoder_attn_layer_norm",
}
SHARED = "model.shared.weight"


def _stack(cfg: BartConfig, side: str, layers: int) -> dict[str, str]:
  """``{our module path: HF module}`` of one side (``encoder`` / ``decoder``)."""
  prefix = f"model.{side}"
  modules = {}
  if cfg.positions == "learned":
    modules[f"{side}/embeddings/position_embeddings"] = f"{prefix}.embed_positions"
  if cfg.embedding_norm:
    modules[f"{side}/embeddings/layer_norm"] = f"{prefix}.layernorm_embedding"
  if cfg.pre_norm:
    modules[f"{side}/final_norm"] = f"{prefix}.layer_norm"
  per_layer = {**_LAYER, **(_CROSS if side == "decoder" else {})}
  for i in range(layers):
    for ours, theirs in per_layer.items():
      modules[f"{side}/layer_{i}/{ours}"] = f"{prefix}.layers.{i}.{theirs}"
  return modules


def leaf_map(cfg: BartConfig) -> dict[str, str]:
  """Our leaf path -> the ``*ForConditionalGeneration`` weight name (BART, mBART, Marian)."""
  words = "embeddings/word_embeddings/embedding"
  if cfg.share_embeddings:
    names = {f"encoder/{words}": SHARED}
  else:
    names = {
      f"encoder/{words}": "model.encoder.embed_tokens.weight",
      f"decoder/{words}": "model.decoder.embed_tokens.weight",
    }
  modules = {
    **_stack(cfg, "encoder", cfg.encoder_layers),
    **_stack(cfg, "decoder", cfg.decoder_layers),
  }
  for ours, theirs in modules.items():
    last = ours.rsplit("/", 1)[-1]
    if last.endswith("norm"):
      leaves = {"scale": "weight", "bias": "bias"}
    elif last.endswith("_embeddings"):
      leaves = {"embedding": "weight"}
    else:
      leaves = {"kernel": "weight", "bias": "bias"}
    for leaf, hf_leaf in leaves.items():
      names[f"{ours}/{leaf}"] = f"{theirs}.{hf_leaf}"
  if not cfg.tie_word_embeddings:
    names["lm_head/kernel"] = LM_HEAD
  if cfg.logits_bias:
    names[LOGITS_BIAS] = LOGITS_BIAS
  return names


def legacy_names(hf_name: str) -> list[str]:
  """Other spellings of a weight name: the shared table under either side's name (older
  exports store all three), and a base model's names without ``model.``."""
  out = []
  if hf_name == SHARED:
    out += ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
  return out + [n.removeprefix("model.") for n in [hf_name, *out] if n.startswith("model.")]


def fit_to_weights(cfg: BartConfig, available: Collection[str], names: Mapping[str, str]) -> Any:
  """``cfg`` without ``final_logits_bias`` when the weights hold none (a base model)."""
  del names
  if cfg.logits_bias and LOGITS_BIAS not in available:
    return cfg.replace(logits_bias=False)
  return cfg


def to_hf_tensor(path: str, value: np.ndarray) -> np.ndarray:
  """Our leaf -> the HF tensor: linear kernels transposed, the logits bias as ``[1, V]``."""
  if path == LOGITS_BIAS:
    return value.reshape(1, -1)
  return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


def from_hf_tensor(path: str, value: np.ndarray) -> np.ndarray:
  """The HF tensor -> our leaf (inverse of :func:`to_hf_tensor`)."""
  if path == LOGITS_BIAS:
    return value.reshape(-1)
  return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


# Stored but not parameters here: the tied tables' other names (exports by older transformers
# hold all of them; used when the config unties them), fairseq's version markers.
BUFFERS = (
  "model.encoder.embed_tokens.weight",
  "model.decoder.embed_tokens.weight",
  LM_HEAD,
  "model.encoder.version",
  "model.decoder.version",
)


# A BERT-like encoder (research.models.bert's paths: MiniLM, BERT, RoBERTa) grafted onto the
# encoder of a BART of its shape (d_model, layers, heads, FFN width and vocabulary alike): the
# BERT2RND idea on a pretrained seq2seq family's own model (``model.graft_rules`` with
# ``init_from=`` the BERT checkpoint, or research.transfer.graft directly). Both are post-LN
# Transformers with GELU and 1/sqrt(d) attention, so the layers map one for one: q/k/v/output,
# FFN, the norm after attention (BERT's attention_norm) and after the FFN (BERT's output_norm
# -> BART's ffn_norm), the embedding LayerNorm, and the word table into BART's shared table
# (encoder, decoder and tied output layer). Left at init: BART's learned positions (read at
# position + 2, so BERT's rows would be off by two), the whole decoder, final_logits_bias.
# Unused in the source: BERT's positions, token types and pooler.
BERT_ENCODER_RULES = (
  (
    r"encoder/embeddings/(word_embeddings/embedding|layer_norm/(scale|bias))",
    r"encoder/embeddings/\1",
  ),
  (
    r"encoder/layer_(\d+)/(attention/(query|key|value|output)|ffn/(intermediate|output))"
    r"/(kernel|bias)",
    r"encoder/layer_\1/\2/\5",
  ),
  (r"encoder/layer_(\d+)/attention_norm/(scale|bias)", r"encoder/layer_\1/attention_norm/\2"),
  (r"encoder/layer_(\d+)/ffn_norm/(scale|bias)", r"encoder/layer_\1/output_norm/\2"),
)

# Tensor parallelism (research.train.parallel): the layers' paths are the shared encoder's
# (attention/{query,key,value,output}, ffn/{intermediate,output}, word_embeddings), so
# family.ENCODER_SHARDING splits both stacks' self- and cross-attention over heads and the FFN
# over its width, and the token table over the vocabulary; the untied output layer and
# final_logits_bias are split over the vocabulary too. Position tables: fsdp only.
SHARDING = (
  (r".*lm_head/kernel", ("fsdp", "tensor")),
  (f".*{LOGITS_BIAS}", ("tensor",)),
  *ENCODER_SHARDING,
)


def family(
  name: str,
  config_type: type[BartConfig],
  from_hf: Any,
  to_hf: Any,
  buffers: tuple[str, ...] = (),
) -> Family:
  """A BART-like family record (BART, mBART, Marian differ in config type, config.json
  translation and Marian's stored position tables)."""
  return Family(
    name=name,
    config_type=config_type,
    encoder=BartEncoder,
    seq2seq=BartModel,
    graft_rules=WHOLE_MODEL_RULES,
    sharding_rules=SHARDING,
    model_types=(name,),
    from_hf=from_hf,
    to_hf=to_hf,
    weight_names=leaf_map,
    to_hf_tensor=to_hf_tensor,
    from_hf_tensor=from_hf_tensor,
    legacy_names=legacy_names,
    fit_to_weights=fit_to_weights,
    buffers=BUFFERS + buffers,
    tiny=config_type.tiny,
  )


FAMILY = family("bart", BartConfig, config_from_hf, config_to_hf)
MBART_FAMILY = family("mbart", MBartConfig, mbart_config_from_hf, config_to_hf)
FAMILIES = (FAMILY, MBART_FAMILY)

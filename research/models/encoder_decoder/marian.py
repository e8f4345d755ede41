"""Marian (Opus-MT): the BART architecture with fixed sinusoidal positions, as a model family.

The modules are research.models.encoder_decoder.bart_modules'; Marian is data there
(:class:`MarianConfig`): positions are sinusoids computed, not stored (transformers never
saves them; older exports that did are read past as buffers), there is no LayerNorm after the
embeddings, blocks are post-LN, and the token embeddings are usually scaled by
``sqrt(d_model)``.

Vocabularies: most Opus-MT models share one table between encoder, decoder and output
(``share_encoder_decoder_embeddings``, stored as ``model.shared.weight``); the others give the
decoder a table of its own of ``decoder_vocab_size`` rows (``model.decoder.embed_tokens``,
``decoder/embeddings/word_embeddings`` here), which the output layer then reuses, and whose
size ``final_logits_bias`` has. Generation starts from ``decoder_start_token_id``, the pad token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from research.models.encoder_decoder import bart, bart_modules

# Position tables some older exports stored: not parameters (the sinusoids are computed).
BUFFERS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


@dataclasses.dataclass(frozen=True)
class MarianConfig(bart_modules.BartConfig):
  """Marian: transformers' MarianConfig defaults (its own type, so its own family)."""

  model_type: str = "marian"
  vocab_size: int = 58101
  positions: str = "sinusoidal"
  position_offset: int = 0
  embedding_norm: bool = False
  pad_token_id: int = 58100
  bos_token_id: int | None = None
  eos_token_id: int | None = 0
  decoder_start_token_id: int = 58100
  forced_eos_token_id: int | None = 0

  @classmethod
  def tiny(cls, **kwargs: Any) -> MarianConfig:
    """A 2+2-layer, 32-wide Marian for tests (pad and decoder start inside its vocabulary)."""
    special = dict(pad_token_id=1, decoder_start_token_id=1, eos_token_id=2, forced_eos_token_id=2)
    return cls(**{**bart_modules.TINY, **special, "scale_embedding": True, **kwargs})


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> MarianConfig:
  """The config of a Marian ``config.json``.

  The tables are one only when ``share_encoder_decoder_embeddings`` and
  ``tie_word_embeddings`` both hold (transformers 5 ties nothing without the latter).

  Raises:
    ValueError: another model type or a missing key, naming ``source``.
  """
  fields = bart.fields_from_hf(hf, source, MarianConfig)
  share = bool(hf.get("share_encoder_decoder_embeddings", True))
  fields["share_embeddings"] = share and fields.get("tie_word_embeddings", True)
  vocab = hf.get("decoder_vocab_size") or fields["vocab_size"]
  fields["decoder_vocab_size"] = None if fields["share_embeddings"] else vocab
  return MarianConfig(**fields)


def config_to_hf(cfg: bart_modules.BartConfig) -> dict[str, Any]:
  """A config.json (research.models.encoder_decoder.bart.hf_fields) with the decoder's
  vocabulary and whether the tables are shared."""
  hf = bart.hf_fields(cfg, "MarianMTModel")
  hf["decoder_vocab_size"] = cfg.target_vocab_size
  # Untied tables are written unshared: transformers then builds no unused ``shared`` table.
  hf["share_encoder_decoder_embeddings"] = cfg.share_embeddings
  return hf


FAMILY = bart.family("marian", MarianConfig, config_from_hf, config_to_hf, buffers=BUFFERS)

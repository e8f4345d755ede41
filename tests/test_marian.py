"""Marian (Opus-MT) against transformers on tiny random checkpoints (tests/bart_like.py).

Three layouts of the vocabulary: one table for encoder, decoder and output (most Opus-MT
models); a decoder vocabulary of its own (``share_encoder_decoder_embeddings=False``,
``decoder_vocab_size``) with the output tied to it; and that with an untied ``lm_head``. Each is
compared on padded batches (encoder states, teacher-forced logits, cached ``decode_step``), then
exported and read back by transformers; the first two are generated from (greedy and beam
search). The sinusoidal position table is checked against transformers' own, value for value.
"""

import bart_like
import numpy as np
import pytest

from research.models import families
from research.models.encoder_decoder import bart, bart_modules, marian

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Opus-MT's settings: swish, scaled embeddings, pad as the decoder start (ids inside the vocab).
OPUS = dict(
  activation_function="swish",
  scale_embedding=True,
  pad_token_id=1,
  decoder_start_token_id=1,
  eos_token_id=2,
  forced_eos_token_id=2,
)
CASES = {
  "marian": OPUS,
  "marian_own_decoder_vocab": dict(
    OPUS, share_encoder_decoder_embeddings=False, decoder_vocab_size=77
  ),
  "marian_own_decoder_vocab_untied": dict(
    OPUS, share_encoder_decoder_embeddings=False, decoder_vocab_size=77, tie_word_embeddings=False
  ),
}


# Generation: bart_like.vary_ends settings that make the hypotheses end at several steps.
GENERATE = {
  "marian": dict(sublayers=2.0, eos_bias=1.8),
  "marian_own_decoder_vocab": dict(sublayers=3.0, eos_bias=1.2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """``(name, vary_ends settings) -> (directory, torch model)``, made once per module on first
  use."""
  made = {}

  def get(name, **tune):
    key = (name, tuple(sorted(tune.items())))
    if key not in made:
      model = bart_like.make_model("MarianConfig", "MarianMTModel", **CASES[name])
      if tune:
        bart_like.vary_ends(model, **tune)
      directory = tmp_path_factory.mktemp(name)
      model.save_pretrained(directory)
      made[key] = (directory, model)
    return made[key]

  return get


@pytest.mark.parametrize("name", list(CASES))
def test_marian_parity_encoder_logits_and_cached_decode(checkpoints, name):
  directory, model = checkpoints(name)
  cfg, params = bart_like.load(directory)
  assert families.family_of(cfg) is marian.FAMILY
  kw = CASES[name]
  assert cfg.target_vocab_size == kw.get("decoder_vocab_size", 99)
  assert ("embeddings" in params["decoder"]) == ("decoder_vocab_size" in kw)  # Only a table.
  assert ("lm_head" in params) == (kw.get("tie_word_embeddings") is False)
  bart_like.check_parity(name, cfg, params, model)


@pytest.mark.parametrize("name", list(CASES))
def test_marian_export_loads_in_transformers_cleanly(checkpoints, tmp_path, name):
  directory, model = checkpoints(name)
  bart_like.check_export(directory, model, tmp_path)


@pytest.mark.parametrize("name", list(GENERATE))
def test_marian_generate_greedy_and_beam_match_transformers(checkpoints, name):
  """Token ids of ``generate`` (greedy and beam 4, ``bart_like.SETTINGS``) and the beam scores,
  from the pad token (Marian's decoder start), EOS forced at the last step; with a shared and
  with a decoder vocabulary of its own."""
  directory, model = checkpoints(name, **GENERATE[name])
  cfg, params = bart_like.load(directory)
  n = 10
  ends = bart_like.check_generate(model, cfg, params, n=n)
  # Hypotheses end at several steps and some run to max length (EOS forced there).
  print(name, "EOS at", sorted(ends))
  assert len(ends - {n - 1}) >= 2 and n - 1 in ends, ends


def test_marian_sinusoids_and_config_translation():
  """The position table equals transformers' (odd width too); config.json both ways."""
  from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

  for width in (32, 7):
    theirs = MarianSinusoidalPositionalEmbedding(50, width).create_weight().numpy()
    np.testing.assert_array_equal(bart_modules.sinusoidal_positions(50, width), theirs)
  for cfg in (
    marian.MarianConfig.tiny(),
    marian.MarianConfig.tiny(share_embeddings=False, decoder_vocab_size=77),
    marian.MarianConfig.tiny(share_embeddings=False, tie_word_embeddings=False),
  ):
    back = marian.config_from_hf(marian.config_to_hf(cfg))
    assert back == cfg.replace(
      hf_config_json=back.hf_config_json,
      decoder_vocab_size=None if cfg.share_embeddings else cfg.target_vocab_size,
    )
  with pytest.raises(ValueError, match=r"cfg\.json.*model_type 'bart' is not 'marian'"):
    marian.config_from_hf(bart.config_to_hf(bart.BartConfig.tiny()), "cfg.json")

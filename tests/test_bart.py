"""BART and mBART against transformers on tiny random checkpoints (tests/bart_like.py).

Each case saves a 2+2-layer ``*ForConditionalGeneration`` made by transformers itself, loads it
with research.transfer.hf and compares, on a right-padded source batch and a padded target
batch, the encoder's last hidden states (the family's encoder alone and the full model's
``encode``) and the teacher-forced logits; then the cached ``decode_step`` against the full
forward, the export read back by transformers, and generation (greedy and beam search). Test
ids carry the family's name, so ``pytest -k mbart`` selects them.
"""

import bart_like
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bart_like import TOL, max_diff

from research.models import families
from research.models.encoder_decoder import bart, bart_modules
from research.transfer import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# name -> (transformers config class, model class, config kwargs, our family)
CASES = {
  "bart": ("BartConfig", "BartForConditionalGeneration", {}, "bart"),
  # mBART with scaled embeddings: pre-LN, final norms and the sqrt(d) scale all exercised.
  "mbart": (
    "MBartConfig",
    "MBartForConditionalGeneration",
    dict(scale_embedding=True),  # No decoder_start_token_id: generate starts from BOS.
    "mbart",
  ),
}
# Generation: bart_like.vary_ends settings that make the hypotheses end at several steps.
GENERATE = {
  "bart": dict(sublayers=2.0, eos_bias=1.0, eos_row=0.3),
  "mbart": dict(sublayers=1.0, eos_bias=1.4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """``(name, vary_ends settings) -> (directory, torch model)``, made once per module on first
  use."""
  made = {}

  def get(name, **tune):
    key = (name, tuple(sorted(tune.items())))
    if key not in made:
      config_cls, model_cls, kwargs, _ = CASES[name]
      model = bart_like.make_model(config_cls, model_cls, **kwargs)
      if tune:
        bart_like.vary_ends(model, **tune)
      directory = tmp_path_factory.mktemp(name)
      model.save_pretrained(directory)
      made[key] = (directory, model)
    return made[key]

  return get


@pytest.mark.parametrize("name", list(CASES))
def test_bart_mbart_parity_encoder_logits_and_cached_decode(checkpoints, name):
  directory, model = checkpoints(name)
  cfg, params = bart_like.load(directory)
  assert families.family_of(cfg).name == CASES[name][3]
  assert families.family_of(cfg).seq2seq is bart_modules.BartModel
  bart_like.check_parity(name, cfg, params, model)


@pytest.mark.parametrize("name", list(CASES))
def test_bart_mbart_export_loads_in_transformers_cleanly(checkpoints, tmp_path, name):
  directory, model = checkpoints(name)
  bart_like.check_export(directory, model, tmp_path)


@pytest.mark.parametrize("name", list(CASES))
def test_bart_mbart_generate_greedy_and_beam_match_transformers(checkpoints, name):
  """Token ids of ``generate`` (greedy and beam 4, ``bart_like.SETTINGS``) and the beam scores,
  from the config's decoder start (BART: EOS), EOS forced at the last step and (mBART, its
  target-language code) a forced first token."""
  directory, model = checkpoints(name, **GENERATE[name])
  cfg, params = bart_like.load(directory)
  forced = dict(forced_bos_token_id=7) if name == "mbart" else {}
  n = 10
  ends = bart_like.check_generate(model, cfg, params, n=n, **forced)
  # Hypotheses end at several steps and some run to max length (EOS forced there): the
  # stopping rules count.
  print(name, "EOS at", sorted(ends))
  assert len(ends - {n - 1}) >= 2 and n - 1 in ends, ends


def test_bart_config_translation_and_errors(tmp_path):
  """config.json both ways, mBART's missing decoder start, a base BartModel without the logits
  bias, and errors that name the file."""
  for family_name, config_type in (("bart", bart.BartConfig), ("mbart", bart.MBartConfig)):
    family = families.family_named(family_name)
    cfg = config_type.tiny(hidden_dropout=0.0, forced_bos_token_id=5)
    assert family.from_hf(family.to_hf(cfg), "x") == cfg.replace(
      hf_config_json=family.from_hf(family.to_hf(cfg), "x").hf_config_json
    )
  hf_mbart = dict(bart.config_to_hf(bart.MBartConfig.tiny()), decoder_start_token_id=None)
  assert bart.mbart_config_from_hf(hf_mbart).decoder_start_token_id == 0  # bos, as generate
  with pytest.raises(ValueError, match=r"cfg\.json.*model_type 'mbart' is not 'bart'"):
    bart.config_from_hf(hf_mbart, "cfg.json")
  with pytest.raises(ValueError, match=r"cfg\.json.*'d_model'"):
    bart.config_from_hf({"model_type": "bart", "vocab_size": 9}, "cfg.json")
  with pytest.raises(ValueError, match="ties both or neither"):
    bart.config_to_hf(bart.BartConfig.tiny(share_embeddings=False))

  torch.manual_seed(0)
  config = transformers.BartConfig(**bart_like.SIZES)
  base = transformers.BartModel(config).eval()
  base.save_pretrained(tmp_path)
  cfg, params = hf.load_pretrained(tmp_path)
  assert not cfg.logits_bias and "final_logits_bias" not in params
  batch = bart_like.inputs(cfg)
  with torch.no_grad():
    want = base(**{k: torch.from_numpy(v).long() for k, v in batch.items()})
  alone, _, _ = bart_like.ours(cfg, params, batch)
  assert max_diff(alone, want.encoder_last_hidden_state.numpy(), batch["attention_mask"]) <= TOL


def test_bart_remat_dropout_bf16_and_first_token_only():
  """The training paths: remat gives the gradients of the plain model (with and without
  dropout), bf16 compute stays close with fp32 logits, and the encoder alone honours
  ``first_token_only``."""
  cfg = bart.MBartConfig.tiny(hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
  ids = jnp.asarray([[5, 6, 7, 1, 1], [8, 9, 10, 11, 12]], jnp.int32)
  mask, dec = (ids != 1).astype(jnp.int32), ids[:, :4]
  plain, remat = bart_modules.BartModel(cfg), bart_modules.BartModel(cfg, remat=True)
  params = plain.init(jax.random.key(0), ids, mask, None, dec)["params"]

  def loss(p, module, deterministic):
    rngs = {"dropout": jax.random.key(1)}
    out = module.apply({"params": p}, ids, mask, None, dec, deterministic=deterministic, rngs=rngs)
    return jnp.sum(out**2)

  for deterministic in (True, False):
    a, b = (jax.grad(loss)(params, m, deterministic) for m in (plain, remat))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)
  low = bart_modules.BartModel(cfg, dtype=jnp.bfloat16).apply(
    {"params": params}, ids, mask, None, dec
  )
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, plain.apply({"params": params}, ids, mask, None, dec), atol=0.05)
  encoder = families.family_of(cfg).encoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
  out = encoder.apply({"params": params["encoder"]}, ids, mask, None, first_token_only=True)
  assert out["hidden_states"].shape == (2, 1, 32) and out["pooled"] is None

"""T5 v1.0, v1.1, mT5 and UMT5 against transformers on tiny random checkpoints it makes itself.

Each case is a 2-layer ``*ForConditionalGeneration`` saved by transformers (eager attention,
norm weights moved off 1, an untied ``lm_head`` for v1.1 / mT5 / UMT5 as their real checkpoints
have), loaded with research.transfer.hf. Compared at real tokens only (padding carries no
meaning in either implementation): the encoder's last hidden states (the family's encoder alone
and the seq2seq model's ``encode``) and the logits under teacher forcing on a padded batch with
both attention masks, the cached ``decode_step`` against the full forward, the export reloaded by
transformers, and ``generate`` (greedy and beam search) token for token. Test ids carry the
variant (``pytest -k umt5``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import paths
from research.models import families
from research.models.encoder_decoder import core, t5
from research.transfer import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB = 99
SIZES = dict(
  vocab_size=VOCAB,
  d_model=32,
  d_kv=8,
  d_ff=37,
  num_layers=2,
  num_heads=4,
  # Few buckets over a short range, so 10-token rows reach the log-spaced buckets too.
  relative_attention_num_buckets=8,
  relative_attention_max_distance=20,
  dropout_rate=0.0,
  decoder_start_token_id=0,
)
GATED = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# name -> (config class, model class, config kwargs, untied lm_head). v1.1 and mT5 get a deeper
# decoder than encoder (transformers' generate cannot run those: its cache counts the encoder's
# layers, so the generate cases keep them equal).
CASES = {
  "t5": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="relu"), False),
  "t5_v1_1": ("T5Config", "T5ForConditionalGeneration", dict(GATED, num_decoder_layers=3), True),
  "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(GATED, num_decoder_layers=3), True),
  "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", GATED, True),
}
# Generation: tokens whose ends vary (EOS made likelier, pad unlikelier; for tied T5 v1.0 the
# decoder's sublayers are strengthened, else every step repeats its input token).
GENERATE = {"t5": dict(eos=1.5, sublayers=4.0), "umt5": dict(eos=2.0, sublayers=1.0)}


def make_model(name: str, eos: float = 1.0, sublayers: float = 1.0, seed: int = 0):
  """The random transformers model of case ``name`` (eval mode, fp32)."""
  config_cls, model_cls, kwargs, untied = CASES[name]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**SIZES, **kwargs)
  config._attn_implementation = "eager"
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for n, param in model.named_parameters():
      if "layer_norm" in n:
        param.add_(0.1 * torch.randn_like(param))
      if n.startswith("decoder.") and n.endswith((".o.weight", ".wo.weight")):
        param.mul_(sublayers)
    if untied:  # Untie as the real v1.1 / mT5 / UMT5 checkpoints are: lm_head.weight stored.
      model.config.tie_word_embeddings = False
      model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, 32))
    model.lm_head.weight[0] *= 0.1
    model.lm_head.weight[1] *= eos
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """``(name, generation settings) -> (directory, transformers model read back from it)``."""
  made: dict[tuple, tuple[Path, object]] = {}

  def get(name: str, **settings) -> tuple[Path, object]:
    key = (name, tuple(sorted(settings.items())))
    if key not in made:
      directory = tmp_path_factory.mktemp(name)
      make_model(name, **settings).save_pretrained(directory)
      cls = getattr(transformers, CASES[name][1])
      made[key] = (directory, cls.from_pretrained(directory, attn_implementation="eager").eval())
    return made[key]

  return get


def batch(lengths, width, seed, start=None):
  """``(ids, mask)`` of rows with ``lengths`` real tokens, right-padded (pad 0) to ``width``."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(3, VOCAB, n)
    mask[i, :n] = 1
  if start is not None:
    ids[:, 0] = start
  return ids, mask


def torch_forward(model, ids, mask, dec, dmask):
  args = dict(
    input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask
  )
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v).long() for k, v in args.items()})
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def max_diff(a, b, mask) -> float:
  real = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(a)[real] - np.asarray(b)[real])))


def test_t5_relative_buckets_equal_transformers():
  """Both directions, over distances far past ``max_distance`` and the log-bucket boundaries."""
  rel = torch.arange(-300, 301)[None, :]
  for buckets, distance in ((32, 128), (8, 20), (16, 32)):
    for bidirectional in (True, False):
      theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
      )
      ours = t5.relative_buckets(rel.numpy(), bidirectional, buckets, distance)
      np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("name", list(CASES))
def test_t5_family_matches_transformers_cache_and_export(checkpoints, tmp_path, name):
  directory, model = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  family = families.family_of(cfg)
  assert family is t5.FAMILY and families.family_for(cfg.model_type) is family
  assert ("lm_head" in params) == CASES[name][3]
  # The encoder alone builds exactly the seq2seq model's encoder subtree.
  ids, mask = batch([10, 4, 7], 10, seed=0)
  dec, dmask = batch([6, 3, 5], 6, seed=1, start=0)
  alone = jax.eval_shape(lambda: family.encoder(cfg).init(jax.random.key(0), ids))["params"]
  assert paths.flatten(alone).keys() == paths.flatten(params["encoder"]).keys()

  seq2seq = family.seq2seq(cfg)
  variables = {"params": params}
  hidden = family.encoder(cfg).apply({"params": params["encoder"]}, ids, mask)["hidden_states"]
  memory = seq2seq.apply(variables, ids, mask, method=seq2seq.encode)
  logits = seq2seq.apply(variables, ids, mask, None, dec, dmask)
  ref_hidden, ref_logits = torch_forward(model, ids, mask, dec, dmask)
  diffs = {
    "encoder": max_diff(hidden, ref_hidden, mask),
    "encode": max_diff(memory, ref_hidden, mask),
    "logits": max_diff(logits, ref_logits, dmask),
  }

  # Cached decoding: one step at a time equals the full forward (rows all real here).
  cache = seq2seq.apply(variables, memory, dec.shape[1] + 2, method=seq2seq.init_cache)
  steps = []
  for i in range(dec.shape[1]):
    step, cache = seq2seq.apply(
      variables, jnp.asarray(dec[:, i]), jnp.asarray(i), cache, mask, method=seq2seq.decode_step
    )
    steps.append(step)
  full = seq2seq.apply(variables, dec, memory, mask, method=seq2seq.decode)
  diffs["cache"] = float(np.max(np.abs(np.stack(steps, axis=1) - np.asarray(full))))

  # Export: transformers reads it with nothing missing or unexpected, and computes the same.
  hf.save_pretrained(tmp_path, cfg, params)
  loaded, info = getattr(transformers, CASES[name][1]).from_pretrained(
    tmp_path, output_loading_info=True, attn_implementation="eager"
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  again_hidden, again_logits = torch_forward(loaded.eval(), ids, mask, dec, dmask)
  diffs["export"] = max(
    max_diff(again_hidden, ref_hidden, mask), max_diff(again_logits, ref_logits, dmask)
  )
  cfg2, params2 = hf.load_pretrained(tmp_path)
  assert cfg2.replace(hf_config_json="{}") == cfg.replace(hf_config_json="{}")
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  print(name, {k: f"{v:.1e}" for k, v in diffs.items()})
  assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("name", list(GENERATE))
def test_generate_t5_greedy_and_beam_equal_transformers(checkpoints, name):
  """Token ids of ``generate`` (greedy; beam 4 under each early-stopping rule and length
  penalties below, at and above 1; forced BOS/EOS and a minimum length) and the beam scores,
  on five sources of 1 to 12 tokens."""
  directory, model = checkpoints(name, **GENERATE[name])
  cfg, params = hf.load_pretrained(directory)
  seq2seq = families.family_of(cfg).seq2seq(cfg)
  ids, mask = batch([9, 3, 6, 12, 1], 12, seed=1)
  n = 12
  ends = set()
  # BART-style processors too: a forced first and last token, a minimum length.
  forced = dict(forced_bos_token_id=5, forced_eos_token_id=cfg.eos_token_id, min_length=4)
  for beams, penalty, early, extra in [
    (1, 1.0, False, {}),
    (4, 1.0, False, {}),
    (4, 1.0, True, {}),
    (4, 0.6, "never", {}),
    (4, 2.0, False, {}),
    (1, 1.0, False, forced),
    (4, 1.0, True, forced),
  ]:
    gen = core.GenerationConfig.for_model(
      cfg, max_new_tokens=n, num_beams=beams, length_penalty=penalty, early_stopping=early, **extra
    )
    ours = core.make_generate(seq2seq, gen)(params, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
      out = model.generate(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        do_sample=False,
        num_beams=beams,
        length_penalty=penalty,
        early_stopping=early,
        max_new_tokens=n,
        output_scores=True,
        return_dict_in_generate=True,
        **extra,
      )
    theirs = np.zeros((len(ids), n), np.int64)  # Without the start token, pad after EOS.
    theirs[:, : out.sequences.shape[1] - 1] = out.sequences[:, 1:].numpy()
    for row in theirs:
      stop = np.flatnonzero(row == cfg.eos_token_id)
      if stop.size:
        row[stop[0] + 1 :] = cfg.pad_token_id
      ends.add(int(stop[0]) if stop.size else n)
    np.testing.assert_array_equal(np.asarray(ours["tokens"]), theirs, err_msg=str(gen))
    if beams > 1:
      np.testing.assert_allclose(ours["scores"], out.sequences_scores.numpy(), atol=TOL)
  # Hypotheses end at several lengths and some run to max length: the stopping rules count.
  print(name, "EOS at", sorted(ends - {n}), "max length reached:", n in ends)
  assert len(ends - {n}) >= 2 and n in ends, ends


def test_t5_encoder_only_checkpoint_loads_exports_and_verifies(tmp_path, capsys):
  """A ``T5EncoderModel`` checkpoint: the encoder for classification, no seq2seq model; an
  encoder-only tree exports as one; and ``verify`` runs the whole model on a full checkpoint."""
  torch.manual_seed(0)
  config = transformers.T5Config(**SIZES)
  transformers.T5EncoderModel(config).eval().save_pretrained(tmp_path / "enc")
  cfg, params = hf.load_pretrained(tmp_path / "enc")
  assert cfg.encoder_only and set(params) == {"encoder"}
  with pytest.raises(ValueError, match="no decoder"):
    t5.FAMILY.seq2seq(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  hf.save_pretrained(tmp_path / "out", cfg, params)
  loaded, info = transformers.T5EncoderModel.from_pretrained(
    tmp_path / "out", output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, mask = batch([10, 4, 7], 10, seed=0)
  ours = t5.FAMILY.encoder(cfg).apply({"params": params["encoder"]}, ids, mask)
  with torch.no_grad():
    theirs = loaded.eval()(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).last_hidden_state.numpy()
  assert max_diff(ours["hidden_states"], theirs, mask) <= TOL
  # A full checkpoint's params cut to the encoder (a classification tree) export the same way.
  full = tmp_path / "full"
  make_model("t5").save_pretrained(full)
  full_cfg, full_params = hf.load_pretrained(full)
  hf.save_pretrained(tmp_path / "cut", full_cfg, {"encoder": full_params["encoder"], "heads": {}})
  cut_cfg, cut = hf.load_pretrained(tmp_path / "cut")
  assert cut_cfg.encoder_only and set(cut) == {"encoder"}
  assert cut_cfg.hf_config["architectures"] == ["T5EncoderModel"]
  assert hf.main(["verify", str(full)]) == 0
  diff = float(capsys.readouterr().out.strip().rsplit("=", 1)[1])
  assert diff <= 1e-4, diff

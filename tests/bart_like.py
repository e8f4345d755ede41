"""Tiny random BART / mBART / Marian checkpoints made with transformers, and the comparisons
tests/test_bart.py and tests/test_marian.py share (no download).

Each model is a transformers ``*ForConditionalGeneration`` with eager attention (the reference
is the plain math, not whichever fused kernel torch picks) whose parameters and
``final_logits_bias`` are moved off their init values so every tensor counts. Comparisons are
made at real tokens only: padding carries no meaning in either implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from research.models import families
from research.models.encoder_decoder import bart_modules
from research.transfer import hf

TOL = 1e-5
SIZES = dict(
  vocab_size=99,
  d_model=32,
  encoder_layers=2,
  decoder_layers=2,
  encoder_attention_heads=4,
  decoder_attention_heads=4,
  encoder_ffn_dim=37,
  decoder_ffn_dim=37,
  max_position_embeddings=64,
)
# generate settings (num_beams, length_penalty, early_stopping, extra kwargs) check_generate
# compares: greedy, and beam 4 under each early-stopping rule with length penalties below, at
# and above 1 (the last with a minimum length, which moves the early ends). "never" is at 1.0:
# on these models it differs from False there (Marian's own decoder vocabulary), not at 0.6.
# Each setting is one compilation, so they are few.
SETTINGS = (
  (1, 1.0, False, {}),
  (4, 0.6, False, {}),
  (4, 1.0, True, {}),
  (4, 1.0, "never", {}),
  (4, 2.0, True, dict(min_length=4)),
)


def make_model(config_cls: str, model_cls: str, seed: int = 0, **kwargs: Any):
  """A random transformers model (eval mode, fp32) of ``SIZES`` updated with ``kwargs``."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**{**SIZES, **kwargs})
  config._attn_implementation = "eager"
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # Biases and norms start at 0 or 1: move them (not the fixed sinusoids).
    for param in model.parameters():
      if param.requires_grad:
        param.add_(0.1 * torch.randn_like(param))
    model.final_logits_bias.add_(0.1 * torch.randn_like(model.final_logits_bias))
  return model


def load(directory: Path) -> tuple[Any, dict[str, Any]]:
  """``(config, params)`` of an HF directory through research.transfer.hf."""
  cfg, params = hf.load_pretrained(directory)
  assert set(params) >= {"encoder", "decoder"}, sorted(params)
  return cfg, params


def batch(pad: int, vocab: int = 99, lengths=(10, 4, 7), width: int = 10, seed: int = 0):
  """``(ids, mask)`` of rows of ``lengths`` real tokens, right-padded to ``width``."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(lengths), width), pad, np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(3, vocab, n)
    mask[i, :n] = 1
  return ids, mask


def inputs(cfg: Any) -> dict[str, np.ndarray]:
  """A padded source batch and a padded target batch (different lengths per row)."""
  ids, mask = batch(cfg.pad_token_id, cfg.vocab_size)
  dec, dmask = batch(cfg.pad_token_id, cfg.target_vocab_size, (6, 3, 5), 6, seed=1)
  return dict(
    input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask
  )


def theirs(model: Any, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """transformers' ``(encoder last hidden states, logits)`` under teacher forcing."""
  import torch

  args = {k: torch.from_numpy(v).long() for k, v in batch.items()}
  with torch.no_grad():
    out = model(**args)
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def ours(cfg: Any, params: dict[str, Any], batch: dict[str, np.ndarray]):
  """Ours: ``(encoder alone's hidden states, the full model's encode, logits)``."""
  family = families.family_of(cfg)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  alone = family.encoder(cfg).apply(
    {"params": params["encoder"]}, b["input_ids"], b["attention_mask"]
  )["hidden_states"]
  model = bart_modules.BartModel(cfg)
  memory = model.apply({"params": params}, b["input_ids"], b["attention_mask"], method="encode")
  logits = model.apply({"params": params}, **b)
  return np.asarray(alone), np.asarray(memory), np.asarray(logits)


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  real = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(a)[real] - np.asarray(b)[real])))


def cached_logits(cfg: Any, params: dict[str, Any], batch: dict[str, np.ndarray]) -> np.ndarray:
  """Logits [B, T, V] decoding ``decoder_input_ids`` one token at a time with the cache."""
  model = bart_modules.BartModel(cfg)
  v = {"params": params}
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  dec = jnp.asarray(batch["decoder_input_ids"])
  memory = model.apply(v, ids, mask, method="encode")
  cache = model.apply(v, memory, dec.shape[1], method="init_cache")
  out = []
  for t in range(dec.shape[1]):
    logits, cache = model.apply(v, dec[:, t], t, cache, mask, method="decode_step")
    out.append(logits)
  return np.stack(out, axis=1)


def vary_ends(model: Any, sublayers: float, eos_bias: float, eos_row: float = 1.0) -> Any:
  """``model`` (in place) made to end its hypotheses at different steps, so that a generation
  comparison exercises the stopping rules: a random model otherwise repeats one token until
  ``max_new_tokens`` or ends at once. The decoder's attention and feed-forward outputs are
  scaled by ``sublayers`` (against the tied embedding that makes each step echo its input), EOS
  gets ``eos_bias`` added to its final logit bias and its embedding row scaled by ``eos_row``
  (BART starts decoding from EOS, which a tied table would echo), and pad is made unlikelier."""
  import torch

  eos, pad = model.config.eos_token_id, model.config.pad_token_id
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.startswith("model.decoder.") and name.endswith(("out_proj.weight", "fc2.weight")):
        param.mul_(sublayers)
    model.final_logits_bias[0, eos] += eos_bias
    model.final_logits_bias[0, pad] -= 2.0
    model.get_input_embeddings().weight[eos] *= eos_row
    if not model.config.tie_word_embeddings:
      model.get_output_embeddings().weight[eos] *= eos_row
  return model


def check_generate(
  model: Any, cfg: Any, params: dict[str, Any], settings=SETTINGS, n: int = 10, **forced: Any
) -> set[int]:
  """Asserts that ``core.make_generate`` gives transformers' ``generate`` token ids (and, for
  beams, its ``sequences_scores`` to ``TOL``) on five sources of 1 to 12 tokens, for each
  ``(num_beams, length_penalty, early_stopping, extra generate kwargs)`` of ``settings``, with
  ``forced`` (e.g. ``forced_bos_token_id``) passed to both. Returns the steps at which
  hypotheses ended (``n``: ran to max length without EOS)."""
  import torch

  from research.models.encoder_decoder import core

  ids, mask = batch(cfg.pad_token_id, cfg.vocab_size, (9, 3, 6, 12, 1), 12, seed=1)
  seq2seq = families.family_of(cfg).seq2seq(cfg)
  eos, ends = cfg.eos_token_id, set()
  for beams, penalty, early, extra in settings:
    kwargs = dict(num_beams=beams, length_penalty=penalty, early_stopping=early, **forced, **extra)
    gen = core.GenerationConfig.for_model(cfg, max_new_tokens=n, **kwargs)
    ours = core.make_generate(seq2seq, gen)(params, jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
      out = model.generate(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        do_sample=False,
        max_new_tokens=n,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
      )
    assert (out.sequences[:, 0] == cfg.decoder_start_token_id).all()
    # Without the start token; transformers stops once every row has ended and pads a finished
    # beam hypothesis with whatever follows it, so compare up to (and including) the first EOS.
    theirs = np.full((len(ids), n), cfg.pad_token_id, np.int64)
    theirs[:, : out.sequences.shape[1] - 1] = out.sequences[:, 1:].numpy()
    for row in theirs:
      stop = np.flatnonzero(row == eos)
      if stop.size:
        row[stop[0] + 1 :] = cfg.pad_token_id
      ends.add(int(stop[0]) if stop.size else n)
    np.testing.assert_array_equal(np.asarray(ours["tokens"]), theirs, err_msg=str(gen))
    if beams > 1:
      np.testing.assert_allclose(
        ours["scores"], out.sequences_scores.numpy(), atol=TOL, err_msg=str(gen)
      )
  return ends


def check_parity(name: str, cfg: Any, params: dict[str, Any], model: Any) -> None:
  """Our encoder alone, the full model's ``encode``, teacher-forced logits and cached decoding
  against the transformers ``model``, each within :data:`TOL` at real tokens."""
  batch = inputs(cfg)
  hidden, logits = theirs(model, batch)
  alone, memory, mine = ours(cfg, params, batch)
  src, tgt = batch["attention_mask"], batch["decoder_attention_mask"]
  diffs = {
    "encoder alone": max_diff(alone, hidden, src),
    "encode": max_diff(memory, hidden, src),
    "logits": max_diff(mine, logits, tgt),
    # Step by step without a target mask: at real (right-padded) targets the causal mask
    # already hides the later padding, so the two must agree there.
    "decode_step": max_diff(cached_logits(cfg, params, batch), mine, tgt),
  }
  print(name, {k: f"{v:.1e}" for k, v in diffs.items()})
  assert all(v <= TOL for v in diffs.values()), diffs


def check_export(directory: Path, model: Any, out: Path) -> None:
  """The checkpoint in ``directory`` loaded, exported to ``out`` and loaded by transformers
  with no key missing or unexpected, the same outputs, and the same config and params back."""
  import jax
  import transformers

  cfg, params = load(directory)
  hf.save_pretrained(out, cfg, params)
  loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
    str(out), output_loading_info=True
  )
  assert type(loaded) is type(model)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  batch = inputs(cfg)
  (h1, l1), (h2, l2) = theirs(loaded.eval(), batch), theirs(model, batch)
  assert max_diff(h1, h2, batch["attention_mask"]) <= TOL
  assert max_diff(l1, l2, batch["decoder_attention_mask"]) <= TOL
  again, params2 = load(out)
  assert again == cfg.replace(hf_config_json=again.hf_config_json)
  jax.tree.map(np.testing.assert_array_equal, params2, params)

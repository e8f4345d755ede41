"""Sequence-to-sequence (translation): teacher-forced cross-entropy, decoding, sacreBLEU and chrF.

Data: ``data_cfg.source_key`` / ``target_key`` texts. The source is encoded by the source
tokenizer with its special tokens; the target by the target tokenizer without them, then
``decoder_input_ids = [BOS] + target`` and ``labels = target + [EOS]`` (the target tokenizer's
bos/eos, else ``[CLS]``/``[SEP]``, as in BERT2BERT warm starts). A pretrained encoder-decoder
(T5, BART, Marian) reads targets the way it was trained instead: ``labels`` are the tokenizer's
encoding with its special tokens and ``decoder_input_ids`` the same shifted right behind the
checkpoint's ``decoder_start_token_id``. Which tokenizers those are is ``tasks.<name>.vocab``
(research.tasks.seq2seq_text): the checkpoint's on both sides, or a cased BPE trained on the
training split for the target (and optionally the source). Model: an EncoderDecoder
(research.models.seq2seq) instead of an encoder with heads, whose decoder's vocabulary is the
target vocabulary, or the pretrained encoder-decoder's own model. Predict mode translates each
line and writes ``translation``.

The kind's functions:

- ``loss(logits, batch, label_smoothing=0.0)``: token cross-entropy against ``labels``
  (``-100`` ignored) with label smoothing (uniform over the vocabulary), summed, and the token
  count. Training passes ``tasks.<name>.loss.label_smoothing``; evaluation keeps 0, so the
  eval ``loss`` is the plain per-token NLL (perplexity = exp(loss)).
- ``predict`` / ``metrics``: teacher-forced next-token accuracy (cheap, every eval).
- ``make_evaluate(model, task, task_cfg, tokenizer)``: the trainer's Evaluator calls the
  returned function on the eval batches; it translates them with the decoding settings of
  ``tasks.<name>.decode`` (greedy or beam search, jitted, with the key/value cache),
  detokenises the hypotheses and scores them against the eval split's original target text:
  ``bleu`` / ``chrf`` (cased sacreBLEU 13a and chrF of the first beam size) with their
  ``bleu_signature`` / ``chrf_signature`` and ``length_ratio``, and ``bleu_<search>`` /
  ``chrf_<search>`` for every beam size (``greedy``, ``beam4``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.data import batching, registry, tokenize
from research.models.common import argmax
from research.tasks import register_kind
from research.tasks import seq2seq_text as text_lib
from research.tasks.kind import TaskKind
from research.tasks.seq2seq_text import as_tokenizers

IGNORE = -100
METRICS = ("bleu", "chrf", "length_ratio", "token_accuracy")
CHUNK = 8192


def encode_pairs(
  tokenizer: Any,
  sources: Sequence[str],
  targets: Sequence[str],
  max_length: int,
  target_max_length: int,
) -> tokenize.Tokenized:
  """Tokenizes source/target pairs into encoder inputs, decoder inputs and labels.

  Args:
    tokenizer: a :class:`~research.tasks.seq2seq_text.Tokenizers`, or one tokenizer for both
      sides.
  """
  tok = as_tokenizers(tokenizer)
  sp = tok.specials()
  # A pretrained encoder-decoder reads targets as it was trained: with the tokenizer's own
  # special tokens, decoder inputs shifted right behind its decoder start token.
  own_specials = tok.decoder_start is not None
  src: list[list[int]] = []
  types: list[list[int]] = []
  tgt: list[list[int]] = []
  for s in range(0, len(sources), CHUNK):
    enc = tokenize.run_tokenizer(
      tok.source,
      list(sources[s : s + CHUNK]),
      truncation=True,
      max_length=max_length,
      slow_ok=True,
    )
    src.extend(enc["input_ids"])
    types.extend(enc["token_type_ids"])
    dec = tokenize.run_tokenizer(
      tok.target,
      text_target=list(targets[s : s + CHUNK]),  # Marian: the target language's SentencePiece.
      slow_ok=True,
      add_special_tokens=own_specials,
      truncation=True,
      max_length=target_max_length if own_specials else target_max_length - 1,
    )
    tgt.extend(dec["input_ids"])
  if own_specials:
    labels = tgt
    decoder_input_ids = tokenize.Ragged.from_rows([[sp["bos"], *t[:-1]] for t in tgt])
  else:
    labels = [[*t, sp["eos"]] for t in tgt]
    decoder_input_ids = tokenize.Ragged.from_rows([[sp["bos"], *t] for t in tgt])
  input_ids = tokenize.Ragged.from_rows(src)
  lengths = np.maximum(input_ids.lengths, decoder_input_ids.lengths).astype(np.int32)
  return tokenize.Tokenized(
    ragged={
      "input_ids": input_ids,
      "token_type_ids": tokenize.Ragged.from_rows(types),
      "decoder_input_ids": decoder_input_ids,
      "labels": tokenize.Ragged.from_rows(labels),
    },
    scalars={},
    lengths=lengths,
    pad_values={
      "input_ids": tok.source_pad,
      "token_type_ids": 0,
      "decoder_input_ids": sp["pad"],
      "labels": IGNORE,
    },
    stats={
      "examples": len(src),
      "source_truncated": int(np.sum(input_ids.lengths >= max_length)),
      "target_truncated": int(np.sum(decoder_input_ids.lengths >= target_max_length)),
    },
  )


def loss(
  logits: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Summed (label-smoothed) cross-entropy over target tokens of real rows, and their count.

  The smoothed target puts ``1 - eps`` on the label and ``eps / V`` on every token, so the loss
  is ``(1 - eps) * nll + eps * (logsumexp - mean(logits))``, without a [B, T, V] one-hot.
  """
  labels = batch["labels"]
  weights = (labels != IGNORE).astype(jnp.float32) * batch["example_mask"][:, None]
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  ce = lse - gold
  if label_smoothing:
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - jnp.mean(logits, axis=-1))
  return jnp.sum(ce * weights), jnp.sum(weights)


def predict(logits: jax.Array, batch: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """The teacher-forced next token at every position."""
  return {"token": argmax(logits)}


def metrics(
  predictions: dict[str, np.ndarray],
  gold: dict[str, np.ndarray],
  label_names: Sequence[str] | None = None,
) -> dict[str, float]:
  """Teacher-forced token accuracy over real target tokens (BLEU comes from the hook)."""
  rows = gold["example_mask"] > 0
  labels, pred = gold["labels"][rows], predictions["token"][rows]
  mask = labels != IGNORE
  return {
    "token_accuracy": float(np.mean(pred[mask] == labels[mask])) if mask.any() else 0.0,
    "examples": int(rows.sum()),
  }


def decode_settings(task_cfg: Any) -> dict[str, Any]:
  """``tasks.<name>.decode`` with defaults: beam sizes, length penalty, maximum length."""
  cfg = dict(task_cfg.get("decode", {}) or {})
  beams = tuple(cfg.get("beam_sizes", (1,)))
  if not beams or min(beams) < 1:
    raise ValueError(f"decode.beam_sizes={beams}: expected beam sizes >= 1")
  return dict(
    beam_sizes=beams,
    alpha=float(cfg.get("alpha", 0.6)),
    max_length=int(cfg.get("max_length", 0) or task_cfg.data.target_max_length),
  )


def search_name(beam: int) -> str:
  """``greedy`` or ``beam<k>``: the suffix of a beam size's metrics."""
  return "greedy" if beam == 1 else f"beam{beam}"


def make_translator(
  model: Any, task: str, task_cfg: Any, tokenizer: Any, beam_size: int
) -> Callable[[Any, dict[str, np.ndarray]], list[str]]:
  """``translate(params, batch) -> detokenised hypotheses``, one per row of ``batch``.

  Sources are re-padded to the data set's largest bucket, so decoding compiles once.
  """
  from research.models.decoding import make_generate, strip

  tok = as_tokenizers(tokenizer)
  settings = decode_settings(task_cfg)
  ids = tok.specials()
  source_pad = tok.source_pad
  generate = make_generate(
    model,
    task,
    max_length=settings["max_length"],
    bos=ids["bos"],
    eos=ids["eos"],
    pad=ids["pad"],
    beam_size=beam_size,
    alpha=settings["alpha"],
  )
  width = int(task_cfg.data.buckets[-1])

  def translate(params, batch, put=lambda b: b) -> list[str]:
    source = {
      "input_ids": _pad_to(batch["input_ids"], width, source_pad),
      "attention_mask": _pad_to(batch["attention_mask"], width, 0),
      "token_type_ids": _pad_to(batch["token_type_ids"], width, 0),
    }
    tokens = np.asarray(jax.device_get(generate(params, put(source))["tokens"]))
    return [tok.decode(row) for row in strip(tokens, ids["eos"])]

  return translate


def _pad_to(x: np.ndarray, width: int, value: int) -> np.ndarray:
  x = np.asarray(x)
  if x.shape[1] > width:
    raise ValueError(f"source of {x.shape[1]} tokens exceeds the largest bucket {width}")
  return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def detokenize(tokenizer: Any, ids: Sequence[int]) -> str:
  """Target ids as text (see :meth:`~research.tasks.seq2seq_text.Tokenizers.decode`)."""
  return as_tokenizers(tokenizer).decode(ids)


def make_evaluate(
  model: Any, task: str, task_cfg: Any, tokenizer: Any
) -> Callable[[Any, list[dict[str, np.ndarray]], Callable], dict[str, Any]]:
  """The Evaluator hook: ``evaluate(params, batches, put) -> {'bleu', 'chrf', ...}``.

  ``bleu``, ``chrf``, their signatures and ``length_ratio`` are those of the first of
  ``decode.beam_sizes``; every beam size also gets ``bleu_<search>`` and ``chrf_<search>``.
  The references are the eval split's target sentences from the data set, in the order of
  the eval batches (the eval plan keeps data order).
  """
  settings = decode_settings(task_cfg)
  translators = {
    k: make_translator(model, task, task_cfg, tokenizer, k) for k in settings["beam_sizes"]
  }
  refs: list[str] = []

  def evaluate(params, batches, put) -> dict[str, Any]:
    if not refs:  # Read once: the eval split does not change during a run.
      refs.extend(text_lib.reference_texts(task_cfg.data))
    out: dict[str, Any] = {}
    for k, translate in translators.items():
      hyps = []
      for batch in batches:
        rows = translate(params, batch, put)
        hyps.extend(h for h, m in zip(rows, batch["example_mask"]) if m)
      scored = text_lib.scores(hyps, refs)
      if k == settings["beam_sizes"][0]:
        out.update(scored)
      out[f"bleu_{search_name(k)}"] = scored["bleu"]
      out[f"chrf_{search_name(k)}"] = scored["chrf"]
    return out

  return evaluate


def translate_lines(
  model: Any,
  params: Any,
  task: str,
  task_cfg: Any,
  tokenizer: Any,
  texts: Sequence[str],
  batch_size: int = 64,
) -> tuple[list[str], int]:
  """Predict mode: translations of ``texts`` (first beam size of ``decode.beam_sizes``).

  Returns:
    ``(translations, number of sources truncated to max_length)``.
  """
  max_length = task_cfg.data.max_length
  tok = encode_pairs(tokenizer, list(texts), [""] * len(texts), max_length, 2)
  full = encode_pairs(tokenizer, list(texts), [""] * len(texts), 10**6, 2) if texts else None
  truncated = int(np.sum(full.ragged["input_ids"].lengths > max_length)) if full else 0
  translate = make_translator(
    model, task, task_cfg, tokenizer, decode_settings(task_cfg)["beam_sizes"][0]
  )
  out: list[str | None] = [None] * len(texts)
  buckets = tuple(task_cfg.data.buckets)
  for rows in batching.eval_plan(len(texts), batch_size) if len(texts) else []:
    batch = batching.assemble(tok, rows, fill=0, length=batching.padded_length(tok, rows, buckets))
    for r, hyp in zip(rows, translate(params, batch)):
      if r >= 0:
        out[r] = hyp
  return out, truncated


@dataclasses.dataclass(frozen=True)
class Seq2SeqEncoder:
  """Source and target texts (see the module docstring); a data-layer ``SplitEncoder``.

  Given one tokenizer, it encodes both sides; given a
  :class:`~research.tasks.seq2seq_text.Tokenizers`, each side with its own.
  """

  encoding: str = "seq2seq-bos-eos"

  def check_data(self, data_cfg: Any) -> None:
    registry.check_bucket_limit(data_cfg, data_cfg.target_max_length, "target_max_length")

  def columns(self, data_cfg: Any) -> list[str]:
    return [data_cfg.source_key, data_cfg.target_key]

  def label_names(self, data_cfg: Any, features: Any) -> list[str]:
    return []  # Labels are target token ids.

  def encode(self, data_cfg: Any, tokenizer: Any, columns: dict, features: Any):
    del features
    return encode_pairs(
      tokenizer,
      columns[data_cfg.source_key],
      columns[data_cfg.target_key],
      data_cfg.max_length,
      data_cfg.target_max_length,
    )


@register_kind("seq2seq")
class Seq2Seq(TaskKind):
  """Text to text with an encoder-decoder; BLEU and chrF from decoding in :meth:`make_evaluate`."""

  metric_names = METRICS
  encoder = Seq2SeqEncoder()

  def build_model(self, config, encoder, **model_kw):
    from research.models import families, seq2seq

    vocab = text_lib.shared_vocab(config)
    if families.family_of(encoder).seq2seq is not None:
      if vocab["target"] != "pretrained" or config.model.init in seq2seq.INIT_MODES:
        raise ValueError(
          f"a pretrained encoder-decoder ({type(encoder).__name__}) keeps its own vocabulary and "
          f"decoder: vocab.target={vocab['target']!r} and model.init={config.model.init!r} are "
          "for encoders given a decoder (use vocab.target='pretrained', model.init='pretrained' "
          "or 'scratch')"
        )
      overrides = dict(config.model.get("decoder_overrides", {}) or {})
      return seq2seq.make_model(encoder, tuple(config.tasks), overrides, **model_kw)
    if getattr(encoder, "peft", None) is not None:
      raise ValueError(
        f"model.peft.method={encoder.peft.method!r}: parameter-efficient transfer is wired for "
        "encoder TaskModels only, not seq2seq (the decoder's cached attention has no LoRA)"
      )
    overrides = dict(config.model.get("decoder_overrides", {}) or {})
    if vocab["target"] != "pretrained":
      # The decoder's embeddings (and tied output layer) are the target vocabulary's.
      if config.model.init == "bert2bert":
        raise ValueError(
          "model.init='bert2bert' copies the encoder's word embeddings into the decoder, so the "
          "target vocabulary must be the checkpoint's (vocab.target='pretrained'); with a "
          f"trained target vocabulary (vocab.target={vocab['target']!r}) use bert2rnd"
        )
      overrides["vocab_size"] = vocab["size"]
    if vocab["source"] == "joint":
      if config.model.init not in ("rnd2rnd", "scratch") or config.init_from:
        raise ValueError(
          "vocab.source='joint' gives the encoder a new vocabulary: train it from scratch "
          f"(model.init='rnd2rnd'), not {config.model.init!r} / init_from"
        )
      encoder = encoder.replace(vocab_size=vocab["size"])
    return seq2seq.make_model(encoder, tuple(config.tasks), overrides, **model_kw)

  # The module's functions are the kind's (they are also used on their own, e.g. in tests).
  loss = staticmethod(loss)
  predict = staticmethod(predict)
  metrics = staticmethod(metrics)

  def tokenizer(self, config, task, pretrained, workdir: str | Path | None = None, build=True):
    return text_lib.load_tokenizers(config, task, pretrained, workdir, build)

  def run_files(self, tokenizer) -> dict[str, str]:
    tok = as_tokenizers(tokenizer)
    return {text_lib.TARGET_FILE: tok.target_json} if tok.target_json is not None else {}

  def make_evaluate(self, model, task, task_cfg, tokenizer):
    return make_evaluate(model, task, task_cfg, tokenizer)

  def predict_lines(self, model, params, task, task_cfg, tokenizer, inputs, batch_size):
    out, truncated = translate_lines(model, params, task, task_cfg, tokenizer, inputs, batch_size)
    return [{"translation": t} for t in out], truncated

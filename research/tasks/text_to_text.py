"""Classification as text to text: a pretrained encoder-decoder writes the label's word.

How T5 does GLUE: ``"sst2 sentence: a charming mess"`` -> ``"positive"``. A kind of its own
rather than an option of ``classification``: data encoding, model, loss and evaluation all
differ from a pooled head's, so an option would branch in every method of that kind, while
here every part is seq2seq's or classification's, reused.

- **Data**: a classification data set (the same registry entries and builders as kind
  ``classification``): source = ``tasks.<name>.prefix`` + text (for pair data sets, +
  ``pair_prefix`` + the second text, e.g. T5's ``"mrpc sentence1: "`` / ``" sentence2: "``);
  target = the class's word: ``tasks.<name>.label_words`` maps label names to words, a name it
  leaves out is its own word. Both are encoded by seq2seq's :func:`~research.tasks.seq2seq.
  encode_pairs` with the checkpoint's tokenizer on both sides and its decoder start token, so
  the target is exactly what seq2seq fine-tuning trains on (``"positive</s>"`` for T5); the
  class id rides along as the scalar field ``class_label``. The prefix and the words are part
  of the task's tokenizer (:class:`LabelWords`), so the tokenized-split cache key covers them
  and predict mode reads them back with the run's config and ``labels.json``.
- **Model**: the family's own seq2seq model (``research.models.seq2seq.FamilySeq2Seq``), every
  weight from the checkpoint; a family without one (BERT-like, decoder-only) is refused.
- **Loss**: seq2seq's teacher-forced token cross-entropy over the word and its end token.
- **Evaluation**: *rank classification* (T0; t5's ``rank_classification`` GLUE evaluation):
  each label word's summed log-likelihood given the source, one teacher-forced decoder pass per
  word over one encoder pass, and the label of the highest. Chosen over greedy generation
  because it always names a valid label (a generated string may match no word, which has to
  count as wrong and says little about a model early in training) and gives a distribution over
  the labels (softmax of the scores) for predict mode's ``probs``. Accuracy and F1 are
  classification's :func:`~research.tasks.classification.metrics`, so results.json reads like a
  classifier's (``accuracy``, ``f1``, ``f1_<class 1>``); the eval step adds the teacher-forced
  ``loss`` (per-token NLL of the gold word) and ``token_accuracy``.
- **Predict mode**: ``label`` and ``probs`` per line, as classification writes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.data import batching, registry, tokenize
from research.tasks import classification, register_kind, seq2seq
from research.tasks import seq2seq_text as text_lib
from research.tasks.kind import TextKind

IGNORE = seq2seq.IGNORE
CLASS_FIELD = "class_label"


def needs_seq2seq(name: str) -> str:
  """The one-line refusal of a family without a seq2seq model."""
  return (
    f"task kind 'text_to_text' needs a pretrained encoder-decoder (T5, BART, Marian); the "
    f"{name} family has no seq2seq model: use kind 'classification' on its encoder instead"
  )


@dataclasses.dataclass(eq=False)
class LabelWords(text_lib.Tokenizers):
  """The checkpoint's tokenizer with the task's prompt: prefix, pair prefix and label words.

  Passed wherever the task's tokenizer goes (data, evaluation, predict mode), so one object says
  how texts and labels become tokens; :meth:`get_vocab` adds the prompt to the tokenizer's
  fingerprint, which keys the tokenized-split cache.

  Attributes:
    names: the data set's label names (index = class id).
    words: each class's target word, in the order of ``names``.
    prefix: put before the text.
    pair_prefix: put between the texts of a pair.
  """

  names: tuple[str, ...] = ()
  words: tuple[str, ...] = ()
  prefix: str = ""
  pair_prefix: str = " "

  def get_vocab(self) -> dict[str, str]:
    prompt = dict(names=self.names, words=self.words, prefix=self.prefix, pair=self.pair_prefix)
    return {**super().get_vocab(), "prompt": json.dumps(prompt)}

  def sources(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[str]:
    """The encoder's input texts: the prefix, the text and, for pairs, the second text."""
    if pairs is None:
      return [f"{self.prefix}{t}" for t in texts]
    return [f"{self.prefix}{a}{self.pair_prefix}{b}" for a, b in zip(texts, pairs, strict=True)]


def label_words(task_cfg: Any, names: Sequence[str]) -> tuple[str, ...]:
  """Each class's word: ``task_cfg.label_words[name]``, else the name itself.

  Raises:
    ValueError: a key that is no label name, an empty word, or two classes with one word (rank
      classification could not tell them apart).
  """
  mapping = dict(task_cfg.get("label_words", {}) or {})
  unknown = sorted(set(mapping) - set(names))
  if unknown:
    raise ValueError(f"label_words: {unknown} are not label names of the data set: {list(names)}")
  words = tuple(str(mapping.get(n, n)) for n in names)
  if not all(w.strip() for w in words):
    raise ValueError(f"label_words: empty word in {dict(zip(names, words))}")
  if len(set(words)) < len(words):
    raise ValueError(f"label_words: two classes share a word: {dict(zip(names, words))}")
  return words


def as_label_words(tokenizer: Any) -> LabelWords:
  """``tokenizer`` when it is the task's :class:`LabelWords`.

  Raises:
    TypeError: any other tokenizer (the words and prefix would be missing).
  """
  if not isinstance(tokenizer, LabelWords):
    raise TypeError(
      f"text_to_text encodes with the task's LabelWords tokenizer (TextToText.tokenizer), not "
      f"{type(tokenizer).__name__}"
    )
  return tokenizer


def candidates(tokenizer: LabelWords, target_max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """The label words as the decoder reads them: ``(decoder_input_ids, labels)`` ``[K, L]``,
  encoded exactly as training targets, padded with pad / ``-100``.

  Raises:
    ValueError: a word longer than ``target_max_length`` tokens (it would be cut in training).
  """
  n = len(tokenizer.words)
  enc = seq2seq.encode_pairs(tokenizer, [""] * n, list(tokenizer.words), 2, 10**6)
  dec, lab = enc.ragged["decoder_input_ids"], enc.ragged["labels"]
  width = int(lab.lengths.max())
  if width > target_max_length:
    long = [w for w, k in zip(tokenizer.words, lab.lengths) if k > target_max_length]
    raise ValueError(
      f"label word(s) {long} take more than data.target_max_length={target_max_length} tokens "
      f"(with the end token); raise target_max_length to at least {width}"
    )
  inputs = np.full((n, width), tokenizer.pad_token_id, np.int32)
  labels = np.full((n, width), IGNORE, np.int32)
  for k in range(n):
    inputs[k, : len(dec[k])] = dec[k]
    labels[k, : len(lab[k])] = lab[k]
  return inputs, labels


def make_scorer(
  model: Any, task: str, tokenizer: Any, target_max_length: int
) -> Callable[[Any, dict[str, Any]], dict[str, jax.Array]]:
  """``score(params, batch) -> {'scores': [B, K], ...}``: each label word's summed
  log-likelihood given each source (jitted; one compile per batch width).

  The source is encoded once; the words are decoded one after another over the whole batch
  (``lax.map``), so memory grows with the batch, not with the number of classes. The batch's
  ``class_label`` and ``example_mask``, when present, come back with the scores, so gold and
  predictions line up however the batch is placed on devices.
  """
  dec, lab = candidates(as_label_words(tokenizer), target_max_length)

  @jax.jit
  def score(params, batch):
    variables = {"params": params}
    mask = batch["attention_mask"]
    ids = batch["input_ids"]
    memory = model.apply(variables, ids, mask, batch.get("token_type_ids"), method=model.encode)

    def one(word):
      d, y = word
      rows = (ids.shape[0], d.shape[0])
      real = y != IGNORE
      logits = model.apply(
        variables,
        jnp.broadcast_to(d, rows),
        memory,
        mask,
        jnp.broadcast_to(real.astype(jnp.int32), rows),
        task=task,
        method=model.decode,
      )
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      gold = jnp.take_along_axis(logp, jnp.broadcast_to(jnp.maximum(y, 0), rows)[..., None], -1)
      return jnp.sum(jnp.where(real, gold[..., 0], 0.0), axis=-1)

    out = {"scores": jax.lax.map(one, (jnp.asarray(dec), jnp.asarray(lab))).T}
    out.update({k: batch[k] for k in (CLASS_FIELD, "example_mask") if k in batch})
    return out

  return score


def rank(scores: np.ndarray) -> dict[str, np.ndarray]:
  """Classification's predictions from the words' scores: the arg-max and a softmax over them."""
  scores = np.asarray(scores, np.float64)
  probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
  return {"label": scores.argmax(axis=-1), "prob": probs / probs.sum(axis=-1, keepdims=True)}


def make_evaluate(
  model: Any, task: str, task_cfg: Any, tokenizer: Any
) -> Callable[[Any, list[dict[str, np.ndarray]], Callable], dict[str, Any]]:
  """The Evaluator hook: rank classification over the eval batches, then classification's
  ``accuracy``, ``f1`` (and ``f1_<class 1>`` for two classes)."""
  score = make_scorer(model, task, tokenizer, task_cfg.data.target_max_length)
  names = list(as_label_words(tokenizer).names)

  def evaluate(params, batches, put) -> dict[str, Any]:
    outs = [jax.device_get(score(params, put(batch))) for batch in batches]
    cat = lambda k: np.concatenate([np.asarray(o[k]) for o in outs])
    gold = {"labels": cat(CLASS_FIELD), "example_mask": cat("example_mask")}
    return classification.metrics(rank(cat("scores")), gold, names)

  return evaluate


@dataclasses.dataclass(frozen=True)
class TextToTextEncoder(tokenize.TextEncoder):
  """Texts and class labels as source and target-word pairs (see the module docstring); a
  data-layer ``SplitEncoder`` reading the same columns and label names as classification's."""

  @property
  def encoding(self) -> str:
    return "text-to-text-v1"

  def check_data(self, data_cfg: ml_collections.ConfigDict) -> None:
    registry.check_bucket_limit(data_cfg, data_cfg.target_max_length, "target_max_length")

  def encode(self, data_cfg, tokenizer, columns, features) -> tokenize.Tokenized:
    tok = as_label_words(tokenizer)
    names = self.label_names(data_cfg, features)
    if list(names) != list(tok.names):
      raise ValueError(
        f"{data_cfg.name}: label names {names}, the task's words are for {tok.names}"
      )
    pairs = columns[data_cfg.text_pair_key] if data_cfg.text_pair_key else None
    classes = np.asarray(columns[data_cfg.label_key], np.int32)
    out = seq2seq.encode_pairs(
      tok,
      tok.sources(columns[data_cfg.text_key], pairs),
      [tok.words[c] for c in classes],
      data_cfg.max_length,
      data_cfg.target_max_length,
    )
    candidates(tok, data_cfg.target_max_length)  # Raises on a word training would cut.
    return dataclasses.replace(out, scalars={**out.scalars, CLASS_FIELD: classes})


@register_kind("text_to_text")
class TextToText(TextKind):
  """Classification by an encoder-decoder that writes each text's label word."""

  metric_names = classification.METRICS
  encoder = TextToTextEncoder()

  def tokenizer(self, config, task, pretrained, workdir: str | Path | None = None, build=True):
    """:class:`LabelWords` over the checkpoint's tokenizer and decoder start. Label names come
    from the data set, or in predict mode (``build=False``) from the run's ``labels.json``."""
    from research.models import families
    from research.transfer import hf

    task_cfg = config.tasks[task]
    model_cfg = hf.load_config(hf.resolve(config.model.checkpoint), config.model.family or None)
    family = families.family_of(model_cfg)
    if family.seq2seq is None:
      raise ValueError(needs_seq2seq(family.name))
    saved = Path(workdir) / "labels.json" if workdir is not None else None
    if not build and saved is not None and saved.is_file():
      names = json.loads(saved.read_text())[task]
    else:
      names = self.label_names(task_cfg.data)
    return LabelWords(
      pretrained,
      pretrained,
      decoder_start=int(model_cfg.decoder_start_token_id),
      names=tuple(names),
      words=label_words(task_cfg, names),
      prefix=str(task_cfg.get("prefix", "") or ""),
      pair_prefix=str(task_cfg.get("pair_prefix", " ")),
    )

  def build_model(self, config, encoder, **model_kw):
    from research.models import families
    from research.models import seq2seq as seq2seq_models

    family = families.family_of(encoder)
    if family.seq2seq is None:
      raise ValueError(needs_seq2seq(family.name))
    if config.model.init in seq2seq_models.INIT_MODES:
      raise ValueError(
        f"model.init={config.model.init!r} gives an encoder a new decoder; a pretrained "
        "encoder-decoder keeps its own: use 'pretrained' or 'scratch'"
      )
    overrides = dict(config.model.get("decoder_overrides", {}) or {})
    return seq2seq_models.make_model(encoder, tuple(config.tasks), overrides, **model_kw)

  # Training and the eval step are seq2seq's; the hook adds rank classification.
  loss = staticmethod(seq2seq.loss)
  predict = staticmethod(seq2seq.predict)
  metrics = staticmethod(seq2seq.metrics)

  def make_evaluate(self, model, task, task_cfg, tokenizer):
    return make_evaluate(model, task, task_cfg, tokenizer)

  def predict_lines(self, model, params, task, task_cfg, tokenizer, inputs, batch_size):
    tok = as_label_words(tokenizer)
    data = task_cfg.data
    pair = bool(data.text_pair_key)
    texts = [x[0] if pair else x for x in inputs]
    sources = tok.sources(texts, [x[1] for x in inputs] if pair else None)
    enc = seq2seq.encode_pairs(tok, sources, [""] * len(sources), data.max_length, 2)
    full = seq2seq.encode_pairs(tok, sources, [""] * len(sources), 10**6, 2) if sources else None
    truncated = int(np.sum(full.ragged["input_ids"].lengths > data.max_length)) if full else 0
    score = make_scorer(model, task, tok, data.target_max_length)
    records: list[dict[str, Any]] = [{} for _ in sources]
    buckets = tuple(data.buckets)
    for rows in batching.eval_plan(len(sources), batch_size) if sources else []:
      length = batching.padded_length(enc, rows, buckets)
      batch = batching.assemble(enc, rows, fill=0, length=length)
      ranked = rank(jax.device_get(score(params, batch))["scores"])
      for r, i in enumerate(rows):
        if i >= 0:
          probs = ranked["prob"][r]
          records[i] = {
            "label": tok.names[int(ranked["label"][r])],
            "probs": {n: round(float(p), 6) for n, p in zip(tok.names, probs)},
          }
    return records, truncated

"""Token tagging (NER): token cross-entropy, entity-level precision / recall / F1.

Data: pre-split words (``data_cfg.tokens_key``) with a tag id each (``tags_key``), converted
from the source's IOB1 / IOB2 / BIOES to ``data_cfg.tag_scheme``. Words are tokenized with
``is_split_into_words``; the word's tag goes on its first sub-token and ``-100`` on special
tokens and later sub-tokens (ignored by loss and metrics), so a word's tag is predicted at its
first sub-token. A word that tokenizes to nothing (e.g. a lone control character) is replaced
by the unknown token so every word keeps its label; words past ``max_length`` are truncated and
counted. Head: one output per token, optionally a CRF (``head.crf``). Predict mode splits a
line on whitespace into words and writes per-word ``tags`` and entity ``spans``.

Entities are read from tag sequences with the conlleval chunking rules that seqeval's default
mode also follows (an ``I-X`` after ``O`` or after another type opens an entity), so our F1
equals seqeval's on the same predictions (tested against seqeval itself).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research.data import tags, tokenize
from research.data.tags import split_tag
from research.models.heads import HeadConfig
from research.tasks import crf, register_kind
from research.tasks.kind import TaskKind

IGNORE = -100
METRICS = ("f1", "precision", "recall", "accuracy")
CHUNK = 8192


def loss(outputs, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed loss over labelled tokens of real examples, and their count.

  Softmax heads: token cross-entropy. CRF heads (``outputs`` is a dict): the negative
  log-likelihood of each sentence's tag path, normalised by the same token count.
  """
  labels = batch["labels"]
  keep = labels != IGNORE
  rows = batch["example_mask"]
  if rows.ndim == 2:  # Packed rows [B, K] (research.data.packing): a row counts if it has one.
    rows = jnp.max(rows, axis=1)
  weights = keep.astype(jnp.float32) * rows[:, None]
  if isinstance(outputs, dict):
    em, mask, order = crf.compact(outputs["emissions"], keep)
    tags = jnp.take_along_axis(labels, order, axis=1)
    ll = crf.log_likelihood(
      em, tags, mask, outputs["transitions"], outputs["start"], outputs["end"]
    )
    return -jnp.sum(ll * batch["example_mask"]), jnp.sum(weights)
  ce = optax.softmax_cross_entropy_with_integer_labels(
    outputs.astype(jnp.float32), jnp.maximum(labels, 0)
  )
  return jnp.sum(ce * weights), jnp.sum(weights)


def predict(outputs, batch: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Tag ids per token; CRF heads decode with Viterbi over the first sub-tokens of words
  (the positions whose label is not ignored, which predict batches mark too)."""
  if isinstance(outputs, dict):
    if batch is None:
      raise ValueError("CRF decoding needs the batch (its labels mark word positions)")
    em, mask, order = crf.compact(outputs["emissions"], batch["labels"] != IGNORE)
    path = crf.viterbi(em, mask, outputs["transitions"], outputs["start"], outputs["end"])
    rows = jnp.arange(path.shape[0])[:, None]
    label = jnp.zeros(batch["labels"].shape, jnp.int32).at[rows, order].set(path)
    return {"label": label, "prob": jnp.ones(label.shape, jnp.float32)}
  probs = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
  return {"label": jnp.argmax(outputs, axis=-1), "prob": jnp.max(probs, axis=-1)}


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  """Whether the chunk open at ``prev`` ends before ``tag`` (conlleval rules)."""
  if prev in ("E", "S"):
    return True
  if prev in ("B", "I") and tag in ("B", "S", "O"):
    return True
  return prev != "O" and prev_type != kind


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  """Whether a chunk starts at ``tag`` (conlleval rules)."""
  if tag in ("B", "S"):
    return True
  if prev in ("E", "S", "O") and tag in ("E", "I"):
    return True
  return tag != "O" and prev_type != kind


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """``(type, first, last)`` spans of a tag sequence (IOB1/IOB2/BIOES)."""
  spans, prev, prev_type, begin = [], "O", "", 0
  for i, tag in enumerate([*tags, "O"]):
    prefix, kind = split_tag(tag)
    if prefix not in ("O", "B", "I", "E", "S"):
      prefix, kind = "O", ""
    kind = kind or ("_" if prefix != "O" else "")
    if _ends(prev, prefix, prev_type, kind):
      spans.append((prev_type, begin, i - 1))
    if _starts(prev, prefix, prev_type, kind):
      begin = i
    prev, prev_type = prefix, kind
  return spans


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
  """Micro P/R/F1 over entities, and per type, from word-level tag sequences."""
  true_set, pred_set = set(), set()
  for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
    true_set |= {(i, *e) for e in entities(g)}
    pred_set |= {(i, *e) for e in entities(p)}

  def prf(t: set, p: set) -> dict[str, float]:
    correct = len(t & p)
    precision = correct / len(p) if p else 0.0
    recall = correct / len(t) if t else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": len(t)}

  out = prf(true_set, pred_set)
  types = sorted({e[1] for e in true_set | pred_set})
  out["per_type"] = {
    k: prf({e for e in true_set if e[1] == k}, {e for e in pred_set if e[1] == k}) for k in types
  }
  return out


def word_tags(
  pred: np.ndarray, labels: np.ndarray, label_names: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
  """Gold and predicted word-level tags: the positions whose label is not ignored."""
  gold_seqs, pred_seqs = [], []
  for p_row, l_row in zip(pred, labels):
    keep = l_row != IGNORE
    gold_seqs.append([label_names[i] for i in l_row[keep]])
    pred_seqs.append([label_names[i] for i in p_row[keep]])
  return gold_seqs, pred_seqs


def metrics(
  predictions: dict[str, np.ndarray],
  gold: dict[str, np.ndarray],
  label_names: Sequence[str] | None = None,
) -> dict:
  """Entity-level P/R/F1 (with a per-type breakdown) and token accuracy over real rows."""
  if label_names is None:
    raise ValueError("tagging metrics need the tag names (label_names)")
  rows = gold["example_mask"] > 0
  pred, labels = predictions["label"][rows], gold["labels"][rows]
  gold_seqs, pred_seqs = word_tags(pred, labels, label_names)
  scores = entity_scores(gold_seqs, pred_seqs)
  mask = labels != IGNORE
  scores["accuracy"] = float(np.mean(pred[mask] == labels[mask])) if mask.any() else 0.0
  scores["examples"] = int(rows.sum())
  return scores


# ----------------------------------------------------------------------------- data


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
  """Word tags on first subwords, ``-100`` on special tokens and continuation subwords."""
  out = []
  prev = None
  for w in word_ids:
    out.append(IGNORE if w is None or w == prev else int(tags[w]))
    prev = w
  return out


def _missing_words(word_ids: Sequence[int | None], n_words: int, truncated: bool) -> list[int]:
  """Words without a first subword that were not cut off by truncation."""
  present = {w for w in word_ids if w is not None}
  last = max(present) if present else -1
  return [w for w in range(n_words) if w not in present and (w < last or not truncated)]


def _truncated(word_ids: Sequence[int | None], n_words: int, max_length: int) -> bool:
  """Whether truncation cut off whole words (the last word has no subword)."""
  last = max((w for w in word_ids if w is not None), default=-1)
  return len(word_ids) >= max_length and last < n_words - 1


def tagging(
  tokenizer: Any,
  words: Sequence[Sequence[str]],
  tags: Sequence[Sequence[int]],
  max_length: int,
) -> tokenize.Tokenized:
  """Tokenizes pre-split words and aligns their tag ids to subwords (see module docstring)."""
  ids: list[list[int]] = []
  types: list[list[int]] = []
  labels: list[list[int]] = []
  stats = {"examples": len(words), "truncated": 0, "unk_words": 0}
  for s in range(0, len(words), CHUNK):
    chunk = [list(w) for w in words[s : s + CHUNK]]
    kwargs = dict(is_split_into_words=True, truncation=True, max_length=max_length)
    enc = tokenize.run_tokenizer(tokenizer, chunk, **kwargs)
    for j, sentence in enumerate(chunk):
      row_ids, row_types, wids = enc["input_ids"][j], enc["token_type_ids"][j], enc.word_ids(j)
      missing = _missing_words(wids, len(sentence), _truncated(wids, len(sentence), max_length))
      if missing:  # Words that vanish (control characters...) become the unknown token.
        stats["unk_words"] += len(missing)
        sentence = [tokenizer.unk_token if w in missing else x for w, x in enumerate(sentence)]
        one = tokenize.run_tokenizer(tokenizer, [sentence], **kwargs)
        row_ids, row_types, wids = one["input_ids"][0], one["token_type_ids"][0], one.word_ids(0)
      truncated = _truncated(wids, len(sentence), max_length)
      stats["truncated"] += int(truncated)
      ids.append(row_ids)
      types.append(row_types)
      labels.append(align_labels(wids, tags[s + j]))
  input_ids = tokenize.Ragged.from_rows(ids)
  if stats["truncated"]:
    logging.warning(
      "%d of %d sentences are longer than max_length=%d subwords; their last words are cut.",
      stats["truncated"],
      len(words),
      max_length,
    )
  return tokenize.Tokenized(
    ragged={
      "input_ids": input_ids,
      "token_type_ids": tokenize.Ragged.from_rows(types),
      "labels": tokenize.Ragged.from_rows(labels),
    },
    scalars={},
    lengths=input_ids.lengths.astype(np.int32),
    pad_values={"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "labels": IGNORE},
    stats=stats,
  )


def _source_tag_names(data_cfg: ml_collections.ConfigDict, features: Any) -> list[str]:
  feature = features[data_cfg.tags_key]
  return list(getattr(feature, "feature", feature).names)


@dataclasses.dataclass(frozen=True)
class TaggingEncoder:
  """Words and their tags (see the module docstring); a data-layer ``SplitEncoder``."""

  encoding: str = "tagging-first-subtoken"

  def check_data(self, data_cfg: ml_collections.ConfigDict) -> None:
    if data_cfg.tag_scheme not in ("iob2", "bioes"):
      raise ValueError(f"data_cfg.tag_scheme={data_cfg.tag_scheme!r}; expected 'iob2' or 'bioes'.")

  def columns(self, data_cfg: ml_collections.ConfigDict) -> list[str]:
    return [data_cfg.tokens_key, data_cfg.tags_key]

  def label_names(self, data_cfg: ml_collections.ConfigDict, features: Any) -> list[str]:
    types = tags.entity_types(_source_tag_names(data_cfg, features))
    return tags.tag_names(types, data_cfg.tag_scheme)

  def encode(
    self,
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    columns: dict[str, list[Any]],
    features: Any,
  ) -> tokenize.Tokenized:
    words, tag_ids = columns[data_cfg.tokens_key], columns[data_cfg.tags_key]
    for i, (w, t) in enumerate(zip(words, tag_ids)):
      if len(w) != len(t):
        raise ValueError(f"{data_cfg.name} example {i}: {len(w)} tokens but {len(t)} tags.")
    src_names = _source_tag_names(data_cfg, features)
    source_scheme = tags.detect_scheme(src_names)
    if source_scheme != data_cfg.tag_scheme:
      target = {n: i for i, n in enumerate(self.label_names(data_cfg, features))}
      convert = lambda t: tags.convert(
        [src_names[j] for j in t], source_scheme, data_cfg.tag_scheme
      )
      tag_ids = [[target[x] for x in convert(t)] for t in tag_ids]
    return tagging(tokenizer, words, tag_ids, data_cfg.max_length)


# ----------------------------------------------------------------------------- the kind


@register_kind("tagging")
class Tagging(TaskKind):
  """One tag per word, predicted at its first sub-token."""

  metric_names = METRICS
  encoder = TaggingEncoder()

  def head(self, task_cfg, num_labels):
    return HeadConfig(layout="token", num_labels=num_labels, **dict(task_cfg.get("head", {}) or {}))

  # The module's functions are the kind's (they are also used on their own, e.g. in tests).
  loss = staticmethod(loss)
  predict = staticmethod(predict)
  metrics = staticmethod(metrics)

  def parse_line(self, text, data_cfg):
    return text.split()

  def encode_inputs(self, tokenizer, inputs, data_cfg):
    tok = tagging(tokenizer, inputs, [[0] * len(w) for w in inputs], data_cfg.max_length)
    return tok, tok.stats["truncated"]

  def render(self, out, row, batch, labels, inputs):
    starts = batch["labels"][row] != IGNORE  # First sub-token of each (kept) word.
    tags_ = [labels[t] for t in out["label"][row][starts]]
    spans = [
      {"type": t, "start": a, "end": b + 1, "text": " ".join(inputs[a : b + 1])}
      for t, a, b in entities(tags_)
    ]
    return {"tags": tags_, "spans": spans, "words": len(inputs), "tagged": len(tags_)}

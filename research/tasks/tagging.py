"""Token tagging (NER): token cross-entropy, entity-level precision / recall / F1.

Labels are per sub-token with -100 where ignored (special tokens, non-first sub-tokens,
padding), so a word's tag is predicted at its first sub-token. Entities are read from tag
sequences with the conlleval chunking rules that seqeval's default mode also follows (an
``I-X`` after ``O`` or after another type opens an entity), so our F1 equals seqeval's on the
same predictions (tested against seqeval itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data.tags import split_tag
from research.tasks import crf

IGNORE = -100
METRICS = ("f1", "precision", "recall", "accuracy")


def loss(outputs, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed loss over labelled tokens of real examples, and their count.

  Softmax heads: token cross-entropy. CRF heads (``outputs`` is a dict): the negative
  log-likelihood of each sentence's tag path, normalised by the same token count.
  """
  labels = batch["labels"]
  keep = labels != IGNORE
  weights = keep.astype(jnp.float32) * batch["example_mask"][:, None]
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

"""Tokenization of whole splits with a fast ``transformers`` tokenizer, into ragged int arrays.

A split is tokenized once (batched), and kept as :class:`Tokenized`: ragged per-token fields
plus per-example scalars and the length that decides its bucket. Bucketing needs every length
before the first batch, and random access to tokenized rows makes the iterator state a single
integer. Results are cached in memory and, when the data set is prepared on disk, as ``.npz``
under ``<data_dir>/tokenized/``.

- classification: ``input_ids``, ``token_type_ids`` (text or text pair), scalar ``labels``;
- tagging: words are tokenized with ``is_split_into_words``; the word's tag goes on its first
  subword and ``-100`` on special tokens and later subwords (ignored by loss and metrics). A word
  that tokenizes to nothing (e.g. a lone control character) is replaced by the unknown token so
  every word keeps its label; words past ``max_length`` are truncated and counted;
- seq2seq: the source is encoded with the tokenizer's special tokens; the target without them,
  then ``decoder_input_ids = [BOS] + target`` and ``labels = target + [EOS]`` (BOS/EOS: the
  tokenizer's bos/eos, else ``[CLS]``/``[SEP]``, as in BERT2BERT warm starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the tokenized representation changes, so stale caches are not reused.
FORMAT_VERSION = 1
IGNORE = -100
_CHUNK = 8192


@dataclasses.dataclass
class Ragged:
  """A list of 1-D int32 arrays stored flat: row i is ``values[offsets[i]:offsets[i+1]]``."""

  values: np.ndarray
  offsets: np.ndarray

  @classmethod
  def from_rows(cls, rows: Sequence[Sequence[int]]) -> Ragged:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(offsets[-1]))
    return cls(values, offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.values[self.offsets[i] : self.offsets[i + 1]]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)


@dataclasses.dataclass
class Tokenized:
  """One tokenized split.

  Attributes:
    ragged: per-token fields (``input_ids``, ``token_type_ids``, tagging ``labels``, seq2seq
      ``decoder_input_ids`` / ``labels``); each row is unpadded.
    scalars: per-example fields (classification ``labels``).
    lengths: the padded length each example needs (max over its ragged fields).
    pad_values: field -> value used for padding.
    stats: counts worth reporting (e.g. ``truncated``).
  """

  ragged: dict[str, Ragged]
  scalars: dict[str, np.ndarray]
  lengths: np.ndarray
  pad_values: dict[str, int]
  stats: dict[str, int]

  def __len__(self) -> int:
    return len(self.lengths)


def special_ids(tokenizer: Any) -> dict[str, int]:
  """``pad``, ``bos`` and ``eos`` ids: the decoder start and end tokens of seq2seq."""
  bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
  pad = tokenizer.pad_token_id
  if bos is None or eos is None or pad is None:
    raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} lacks a bos/cls, eos/sep or pad token.")
  return {"pad": int(pad), "bos": int(bos), "eos": int(eos)}


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """A digest of the tokenizer's vocabulary and settings (cache key); memoised per object."""
  try:
    size, digest = _FINGERPRINTS[tokenizer]
    if size == len(tokenizer):  # Tokens added since: recompute.
      return digest
  except (KeyError, TypeError):
    pass
  h = hashlib.sha256()
  h.update(f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}".encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    state = json.loads(backend.to_str())
    state.pop("truncation", None)  # Set by every call with truncation=True: not the vocabulary.
    state.pop("padding", None)
    h.update(json.dumps(state, sort_keys=True).encode())
  else:
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(json.dumps(special_ids(tokenizer), sort_keys=True).encode())
  digest = h.hexdigest()[:16]
  with contextlib.suppress(TypeError):
    _FINGERPRINTS[tokenizer] = (len(tokenizer), digest)
  return digest


def _encode(tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
  if not getattr(tokenizer, "is_fast", False):
    raise TypeError(f"A fast tokenizer is required, got {type(tokenizer).__name__}.")
  return tokenizer(*args, return_attention_mask=False, return_token_type_ids=True, **kwargs)


def classification(
  tokenizer: Any,
  texts: Sequence[str],
  labels: Sequence[int],
  max_length: int,
  pairs: Sequence[str] | None = None,
) -> Tokenized:
  """Tokenizes single texts or text pairs with their class labels."""
  ids: list[list[int]] = []
  types: list[list[int]] = []
  for s in range(0, len(texts), _CHUNK):
    args = [list(texts[s : s + _CHUNK])]
    if pairs is not None:
      args.append(list(pairs[s : s + _CHUNK]))
    enc = _encode(tokenizer, *args, truncation=True, max_length=max_length)
    ids.extend(enc["input_ids"])
    types.extend(enc["token_type_ids"])
  input_ids = Ragged.from_rows(ids)
  truncated = int(np.sum(input_ids.lengths >= max_length))
  return Tokenized(
    ragged={"input_ids": input_ids, "token_type_ids": Ragged.from_rows(types)},
    scalars={"labels": np.asarray(labels, dtype=np.int32)},
    lengths=input_ids.lengths.astype(np.int32),
    pad_values={"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "labels": 0},
    stats={"examples": len(ids), "at_max_length": truncated},
  )


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
) -> Tokenized:
  """Tokenizes pre-split words and aligns their tag ids to subwords (see module docstring)."""
  ids: list[list[int]] = []
  types: list[list[int]] = []
  labels: list[list[int]] = []
  stats = {"examples": len(words), "truncated": 0, "unk_words": 0}
  for s in range(0, len(words), _CHUNK):
    chunk = [list(w) for w in words[s : s + _CHUNK]]
    kwargs = dict(is_split_into_words=True, truncation=True, max_length=max_length)
    enc = _encode(tokenizer, chunk, **kwargs)
    for j, sentence in enumerate(chunk):
      row_ids, row_types, wids = enc["input_ids"][j], enc["token_type_ids"][j], enc.word_ids(j)
      missing = _missing_words(wids, len(sentence), _truncated(wids, len(sentence), max_length))
      if missing:  # Words that vanish (control characters...) become the unknown token.
        stats["unk_words"] += len(missing)
        sentence = [tokenizer.unk_token if w in missing else x for w, x in enumerate(sentence)]
        one = _encode(tokenizer, [sentence], **kwargs)
        row_ids, row_types, wids = one["input_ids"][0], one["token_type_ids"][0], one.word_ids(0)
      truncated = _truncated(wids, len(sentence), max_length)
      stats["truncated"] += int(truncated)
      ids.append(row_ids)
      types.append(row_types)
      labels.append(align_labels(wids, tags[s + j]))
  input_ids = Ragged.from_rows(ids)
  if stats["truncated"]:
    logging.warning(
      "%d of %d sentences are longer than max_length=%d subwords; their last words are cut.",
      stats["truncated"],
      len(words),
      max_length,
    )
  return Tokenized(
    ragged={
      "input_ids": input_ids,
      "token_type_ids": Ragged.from_rows(types),
      "labels": Ragged.from_rows(labels),
    },
    scalars={},
    lengths=input_ids.lengths.astype(np.int32),
    pad_values={"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "labels": IGNORE},
    stats=stats,
  )


def seq2seq(
  tokenizer: Any,
  sources: Sequence[str],
  targets: Sequence[str],
  max_length: int,
  target_max_length: int,
) -> Tokenized:
  """Tokenizes source/target pairs into encoder inputs, decoder inputs and labels."""
  sp = special_ids(tokenizer)
  src: list[list[int]] = []
  types: list[list[int]] = []
  tgt: list[list[int]] = []
  for s in range(0, len(sources), _CHUNK):
    enc = _encode(tokenizer, list(sources[s : s + _CHUNK]), truncation=True, max_length=max_length)
    src.extend(enc["input_ids"])
    types.extend(enc["token_type_ids"])
    dec = _encode(
      tokenizer,
      list(targets[s : s + _CHUNK]),
      add_special_tokens=False,
      truncation=True,
      max_length=target_max_length - 1,
    )
    tgt.extend(dec["input_ids"])
  input_ids = Ragged.from_rows(src)
  decoder_input_ids = Ragged.from_rows([[sp["bos"], *t] for t in tgt])
  lengths = np.maximum(input_ids.lengths, decoder_input_ids.lengths).astype(np.int32)
  return Tokenized(
    ragged={
      "input_ids": input_ids,
      "token_type_ids": Ragged.from_rows(types),
      "decoder_input_ids": decoder_input_ids,
      "labels": Ragged.from_rows([[*t, sp["eos"]] for t in tgt]),
    },
    scalars={},
    lengths=lengths,
    pad_values={
      "input_ids": sp["pad"],
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


def save(tok: Tokenized, path: Path) -> None:
  """Writes a :class:`Tokenized` as ``.npz`` atomically (temp file, then rename)."""
  arrays: dict[str, np.ndarray] = {"lengths": tok.lengths}
  for k, r in tok.ragged.items():
    arrays[f"ragged.{k}.values"] = r.values
    arrays[f"ragged.{k}.offsets"] = r.offsets
  for k, v in tok.scalars.items():
    arrays[f"scalar.{k}"] = v
  meta = json.dumps({"pad_values": tok.pad_values, "stats": tok.stats})
  arrays["meta"] = np.frombuffer(meta.encode(), dtype=np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load(path: Path) -> Tokenized:
  """Reads a :class:`Tokenized` written by :func:`save`."""
  with np.load(path) as z:
    meta = json.loads(bytes(z["meta"]).decode())
    ragged = {
      k.split(".")[1]: Ragged(z[k], z[k.replace(".values", ".offsets")])
      for k in z.files
      if k.startswith("ragged.") and k.endswith(".values")
    }
    scalars = {k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("scalar.")}
    return Tokenized(ragged, scalars, z["lengths"], meta["pad_values"], meta["stats"])

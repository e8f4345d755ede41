"""Tokenization of whole splits with a fast ``transformers`` tokenizer, into ragged int arrays.

A split is tokenized once (batched), and kept as :class:`Tokenized`: ragged per-token fields
plus per-example scalars and the length that decides its bucket. Bucketing needs every length
before the first batch, and random access to tokenized rows makes the iterator state a single
integer. Results are cached in memory and, when the data set is prepared on disk, as ``.npz``
under ``<data_dir>/tokenized/``.

*How* a split is read and tokenized belongs to the task kind that trains on it (the data layer
knows no kinds): a kind hands the pipeline a :class:`SplitEncoder` (the tagging kind aligns word
tags to first sub-tokens, the seq2seq kind encodes targets, see ``research/tasks/``). This
module keeps the shared pieces: :func:`texts` (single texts or text pairs, the tokenizer's pair
encoding with token type ids and separators, one scalar label each) and :class:`TextEncoder`,
the encoder of text data sets with one label per text or pair, which is also the default of
:func:`research.data.build_iterator`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import ml_collections
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


SPECIAL_NAMES = ("pad", "bos", "eos", "cls", "sep", "unk")
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
  # Every special id the tokenizer has (a T5 tokenizer has no bos or cls: None, not an error).
  specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in SPECIAL_NAMES}
  h.update(json.dumps(specials, sort_keys=True).encode())
  digest = h.hexdigest()[:16]
  with contextlib.suppress(TypeError):
    _FINGERPRINTS[tokenizer] = (len(tokenizer), digest)
  return digest


def run_tokenizer(tokenizer: Any, *args: Any, slow_ok: bool = False, **kwargs: Any) -> Any:
  """The fast tokenizer's encoding of ``args`` with token type ids, without attention masks.

  ``slow_ok`` admits a Python tokenizer where nothing needs a fast one's offsets or word ids
  (seq2seq text: Opus-MT's SentencePiece tokenizers exist only as Python tokenizers).
  """
  if not slow_ok and not getattr(tokenizer, "is_fast", False):
    raise TypeError(f"A fast tokenizer is required, got {type(tokenizer).__name__}.")
  return tokenizer(*args, return_attention_mask=False, return_token_type_ids=True, **kwargs)


def texts(
  tokenizer: Any,
  texts: Sequence[str],
  max_length: int,
  pairs: Sequence[str] | None = None,
  labels: Sequence[Any] | None = None,
  label_dtype: Any = np.int32,
) -> Tokenized:
  """Tokenizes single texts or text pairs (``[CLS] a [SEP] b [SEP]`` with token type ids).

  Args:
    tokenizer: a fast tokenizer.
    texts: the first (or only) texts.
    max_length: truncation length, special tokens included (pairs: of both texts together).
    pairs: the second texts of pairs, or None.
    labels: one label per text (stored as the scalar ``labels``); None stores zeros.
    label_dtype: the dtype of the stored labels (int32 class ids, float32 scores).

  Returns:
    A :class:`Tokenized` whose length is the joint length of each row, so pairs are bucketed
    on both texts.
  """
  ids: list[list[int]] = []
  types: list[list[int]] = []
  for s in range(0, len(texts), _CHUNK):
    args = [list(texts[s : s + _CHUNK])]
    if pairs is not None:
      args.append(list(pairs[s : s + _CHUNK]))
    enc = run_tokenizer(tokenizer, *args, truncation=True, max_length=max_length)
    ids.extend(enc["input_ids"])
    types.extend(enc["token_type_ids"])
  input_ids = Ragged.from_rows(ids)
  truncated = int(np.sum(input_ids.lengths >= max_length))
  labels = np.zeros(len(ids)) if labels is None else labels
  return Tokenized(
    ragged={"input_ids": input_ids, "token_type_ids": Ragged.from_rows(types)},
    scalars={"labels": np.asarray(labels, dtype=label_dtype)},
    lengths=input_ids.lengths.astype(np.int32),
    pad_values={"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "labels": 0},
    stats={"examples": len(ids), "at_max_length": truncated},
  )


class SplitEncoder(Protocol):
  """How a split of a data set becomes a :class:`Tokenized` (implemented by task kinds).

  Attributes:
    encoding: names the encoding in tokenized-cache keys: two encoders with the same name must
      produce the same arrays from the same data.
  """

  encoding: str

  def check_data(self, data_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError on ``data_cfg`` fields this encoding cannot use."""

  def columns(self, data_cfg: ml_collections.ConfigDict) -> list[str]:
    """The data set's features the encoding reads."""

  def label_names(self, data_cfg: ml_collections.ConfigDict, features: Any) -> list[str]:
    """Label names (index = label id in batches) from the data set's tfds ``features``."""

  def encode(
    self,
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    columns: dict[str, list[Any]],
    features: Any,
  ) -> Tokenized:
    """The tokenized split from its ``columns`` (feature -> values in data order)."""


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """Texts (``text_key``, and ``text_pair_key`` when set) with one label each (``label_key``).

  Class labels are stored as int32 ids and their names come from the ClassLabel feature; with
  ``float_labels`` the labels are stored as float32 scores and there are no label names.
  """

  float_labels: bool = False

  @property
  def encoding(self) -> str:
    return "text-float32" if self.float_labels else "text-int32"

  def check_data(self, data_cfg: ml_collections.ConfigDict) -> None:
    del data_cfg

  def columns(self, data_cfg: ml_collections.ConfigDict) -> list[str]:
    keys = [data_cfg.text_key, data_cfg.label_key]
    return keys + ([data_cfg.text_pair_key] if data_cfg.text_pair_key else [])

  def label_names(self, data_cfg: ml_collections.ConfigDict, features: Any) -> list[str]:
    if data_cfg.label_key not in features:
      raise KeyError(
        f"{data_cfg.name}: no label feature {data_cfg.label_key!r} (features: "
        f"{sorted(features.keys())}); is this data set for another task kind?"
      )
    names = getattr(features[data_cfg.label_key], "names", None)
    if self.float_labels:
      return []
    if names is None:
      raise ValueError(
        f"{data_cfg.name}: label {data_cfg.label_key!r} is not a class label (a score?); "
        "read it with float labels (task kind 'regression')."
      )
    return list(names)

  def encode(
    self,
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    columns: dict[str, list[Any]],
    features: Any,
  ) -> Tokenized:
    del features
    pairs = columns[data_cfg.text_pair_key] if data_cfg.text_pair_key else None
    return texts(
      tokenizer,
      columns[data_cfg.text_key],
      data_cfg.max_length,
      pairs=pairs,
      labels=columns[data_cfg.label_key],
      label_dtype=np.float32 if self.float_labels else np.int32,
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

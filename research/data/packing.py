"""Sequence packing: several examples per row, kept apart by segment ids (``data_cfg.packing``).

Short examples (SST-2's median is 10 tokens) waste most of a padded row; packing lays several
of them end to end in one row of ``width`` tokens instead. Each example of a row gets a segment
id ``1..k`` (0 = padding) and positions restarting at 0, and the model attends only within a
segment (research.models.encoder) and pools per segment (research.models.heads), so an
example's outputs are those it would get alone.

A packed batch holds the usual per-token fields ``[R, T]`` laid out packed (``input_ids``,
``token_type_ids``, tagging ``labels`` with ``-100`` on padding), ``attention_mask`` (segment
> 0), ``segment_ids`` and ``position_ids`` ``[R, T]``, and the per-example fields (classification
``labels``, ``example_mask``) as ``[R, K]``, ``K = data_cfg.packing_max_per_row``: slot ``k`` of
row ``r`` is segment ``k + 1``. The losses sum over examples (or tokens) weighted by
``example_mask`` and the step divides by the summed weight, so a packed batch gives the loss and
gradients of the same examples unpacked: a mean over examples, not rows.

Which examples share a row is fixed by the seed (first-fit decreasing over seeded pools of
examples), and each epoch shuffles the rows into batches, so every epoch has the same number of
batches, which a grain ``MapDataset`` over batch indices needs. ``train.batch_size`` then counts
rows, not examples. Only training batches are packed; evaluation stays one example per row.
"""

from __future__ import annotations

import numpy as np

from research.data.tokenize import Tokenized


def pack(
  lengths: np.ndarray, width: int, max_per_row: int, seed: int, pool: int = 4096
) -> np.ndarray:
  """Example indices per row ``[rows, max_per_row]`` (``-1`` = empty slot).

  The examples are permuted by ``seed``, cut into pools of ``pool`` examples, and each pool is
  packed first-fit decreasing: longest first, each into the first row with room for its
  length and a free slot. Every example appears exactly once; no row holds more than ``width``
  tokens.

  Raises:
    ValueError: if an example is longer than ``width`` or ``max_per_row < 1``.
  """
  lengths = np.asarray(lengths, dtype=np.int64)
  if max_per_row < 1:
    raise ValueError(f"packing_max_per_row={max_per_row} must be >= 1.")
  if len(lengths) and int(lengths.max()) > width:
    raise ValueError(f"An example of {int(lengths.max())} tokens exceeds the row width {width}.")
  order = np.random.default_rng([seed, 0x9ACC]).permutation(len(lengths))
  rows: list[np.ndarray] = []
  for start in range(0, len(order), max(1, pool)):
    chunk = order[start : start + pool]
    chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
    slots = np.full((len(chunk), max_per_row), -1, dtype=np.int64)
    room = np.full(len(chunk), width, dtype=np.int64)  # Worst case: one row per example.
    count = np.zeros(len(chunk), dtype=np.int64)
    used = 0
    for i in chunk:
      fits = (room[: used + 1] >= lengths[i]) & (count[: used + 1] < max_per_row)
      r = int(np.argmax(fits))  # Row ``used`` is empty, so something always fits.
      slots[r, count[r]] = i
      room[r] -= lengths[i]
      count[r] += 1
      used = max(used, r + 1)
    rows.append(slots[:used])
  if not rows:
    return np.full((0, max_per_row), -1, dtype=np.int64)
  return np.concatenate(rows)


def row_lengths(lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Tokens used in each packed row."""
  lengths = np.asarray(lengths)
  return np.where(rows >= 0, lengths[np.maximum(rows, 0)], 0).sum(axis=1)


def epoch_plan(num_rows: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """Row indices per batch ``[num_batches, batch_size]``: the rows shuffled for ``epoch``, the
  last ``num_rows % batch_size`` dropped.

  Raises:
    ValueError: if there are fewer rows than one batch.
  """
  num_batches = num_rows // batch_size
  if num_batches == 0:
    raise ValueError(f"{num_rows} packed rows cannot fill one batch of {batch_size}.")
  order = np.random.default_rng([seed, epoch, 0x9ACC]).permutation(num_rows)
  return order[: num_batches * batch_size].reshape(num_batches, batch_size)


def padding_fraction(lengths: np.ndarray, rows: np.ndarray, padded_length: int) -> float:
  """Fraction of padded token slots when ``rows`` are padded to ``padded_length`` each."""
  if len(rows) == 0:
    return 0.0
  return 1.0 - float(row_lengths(lengths, rows).sum()) / (len(rows) * padded_length)


def assemble(tok: Tokenized, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """One packed batch from ``rows`` ``[R, K]`` of example indices (``-1`` = empty slot).

  Returns:
    Every ragged field of ``tok`` laid out packed ``[R, length]`` (int32, padded with its pad
    value), ``attention_mask``, ``segment_ids``, ``position_ids`` ``[R, length]`` int32, every
    scalar field ``[R, K]`` (empty slots copy the row's first example and weigh 0) and
    ``example_mask`` ``[R, K]`` float32.

  Raises:
    ValueError: if a row's examples need more than ``length`` tokens, or ``tok`` has a decoder
      side (seq2seq targets cannot be packed this way).
  """
  if "decoder_input_ids" in tok.ragged:
    raise ValueError("data_cfg.packing: seq2seq data (decoder inputs) cannot be packed.")
  r_count, k_count = rows.shape
  out = {
    name: np.full((r_count, length), tok.pad_values[name], dtype=np.int32) for name in tok.ragged
  }
  segments = np.zeros((r_count, length), dtype=np.int32)
  positions = np.zeros((r_count, length), dtype=np.int32)
  lengths = tok.ragged["input_ids"].lengths
  for r in range(r_count):
    at = 0
    for k in range(k_count):
      i = int(rows[r, k])
      if i < 0:
        continue
      n = int(lengths[i])
      if at + n > length:
        raise ValueError(f"Packed row {r} needs more than {length} tokens.")
      for name, ragged in tok.ragged.items():
        out[name][r, at : at + n] = ragged[i]
      segments[r, at : at + n] = k + 1
      positions[r, at : at + n] = np.arange(n)
      at += n
  out["attention_mask"] = (segments > 0).astype(np.int32)
  out["segment_ids"] = segments
  out["position_ids"] = positions
  mask = (rows >= 0).astype(np.float32)
  fill = np.where(rows >= 0, rows, np.maximum(rows[:, :1], 0))
  for name, values in tok.scalars.items():
    out[name] = values[fill]
  out["example_mask"] = mask
  return out

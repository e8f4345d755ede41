"""Length-bucketed batching: which examples form each batch, and their padding to bucket shapes.

A *plan* is an int array ``[num_batches, batch_size]`` of example indices (``-1`` = padding row)
over the GLOBAL batch. Every process computes the same plan from the same seed and takes its
own row slice, so all processes agree on each step's padded length ``T`` (needed by multi-host
jit) and their rows are disjoint.

Training plans (one per epoch): a seeded permutation, cut into pools of ``pool_batches`` batches;
each pool is sorted by length and cut into batches; the batches of the epoch are shuffled. Rows
of a batch then have similar lengths, and ``T`` is the smallest bucket that holds the longest, so
jit compiles at most ``len(buckets)`` shapes. The last ``n % batch_size`` examples of each
(differently permuted) epoch are dropped. Evaluation plans keep data order, in one pass, with
the last batch filled up by padding rows (``example_mask`` 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from research.data.tokenize import Tokenized


def bucket_of(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= ``length``.

  Raises:
    ValueError: if ``length`` exceeds the largest bucket.
  """
  i = int(np.searchsorted(np.asarray(buckets), length, side="left"))
  if i >= len(buckets):
    raise ValueError(f"Length {length} exceeds the largest bucket {buckets[-1]}.")
  return int(buckets[i])


def train_plan(
  lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool_batches: int
) -> np.ndarray:
  """The batches of one training epoch (see module docstring).

  Raises:
    ValueError: if there are fewer examples than one batch.
  """
  n = len(lengths)
  num_batches = n // batch_size
  if num_batches == 0:
    raise ValueError(f"{n} examples cannot fill one batch of {batch_size}.")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)[: num_batches * batch_size]
  pool = max(1, pool_batches) * batch_size
  batches = []
  for start in range(0, len(order), pool):
    chunk = order[start : start + pool]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches.append(chunk.reshape(-1, batch_size))
  plan = np.concatenate(batches)
  return plan[rng.permutation(num_batches)]


def eval_plan(n: int, batch_size: int) -> np.ndarray:
  """All ``n`` examples in order; the last batch is completed with ``-1`` (padding rows)."""
  num_batches = max(1, -(-n // batch_size))
  plan = np.full(num_batches * batch_size, -1, dtype=np.int64)
  plan[:n] = np.arange(n)
  return plan.reshape(num_batches, batch_size)


def padded_length(tok: Tokenized, rows: np.ndarray, buckets: Sequence[int]) -> int:
  """The bucket length of a global batch (its ``-1`` rows excluded)."""
  real = rows[rows >= 0]
  return bucket_of(int(tok.lengths[real].max()) if len(real) else 1, buckets)


def padding_fraction(tok: Tokenized, plan: np.ndarray, buckets: Sequence[int]) -> float:
  """Fraction of padded token slots over all batches of ``plan`` (real rows only)."""
  real = padded = 0
  for rows in plan:
    rows = rows[rows >= 0]
    t = padded_length(tok, rows, buckets)
    real += int(tok.lengths[rows].sum())
    padded += t * len(rows)
  return 1.0 - real / max(padded, 1)


def assemble(tok: Tokenized, rows: np.ndarray, fill: int, length: int) -> dict[str, np.ndarray]:
  """Pads the examples ``rows`` to ``length`` (a process's slice of one global batch).

  Args:
    tok: the tokenized split.
    rows: example indices, ``-1`` for padding rows.
    fill: a real example index copied into padding rows (so they stay well-formed inputs);
      their ``example_mask`` is 0 and their token-level labels are ``-100``.
    length: the batch's bucket length ``T``.

  Returns:
    ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, T] and every other ragged field
    [B, T] as int32, the scalar fields [B] in their stored dtype (``labels``: int32 class ids,
    float32 scores), ``example_mask`` [B] float32; with ``decoder_input_ids`` also
    ``decoder_attention_mask`` [B, T].
  """
  mask = (rows >= 0).astype(np.float32)
  src = np.where(rows >= 0, rows, fill)
  b = len(rows)
  out: dict[str, np.ndarray] = {}
  for name, ragged in tok.ragged.items():
    arr = np.full((b, length), tok.pad_values[name], dtype=np.int32)
    for r, i in enumerate(src):
      row = ragged[i]
      arr[r, : len(row)] = row
    out[name] = arr
  ids = tok.ragged["input_ids"]
  lens = ids.lengths[src]
  out["attention_mask"] = (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
  if "decoder_input_ids" in tok.ragged:
    dlens = tok.ragged["decoder_input_ids"].lengths[src]
    out["decoder_attention_mask"] = (np.arange(length)[None, :] < dlens[:, None]).astype(np.int32)
  for name, values in tok.scalars.items():  # int32 class ids, float32 scores, ...
    out[name] = values[src]
  if "labels" in tok.ragged:
    out["labels"][mask == 0] = tok.pad_values["labels"]
  out["example_mask"] = mask
  return out

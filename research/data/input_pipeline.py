"""The input pipeline: tfds ArrayRecord data -> tokenized split -> bucketed numpy batches (grain).

Usage::

  from research.data import build_iterator, default_data_config, label_names
  data_cfg = default_data_config("sst2")
  it = build_iterator(data_cfg, tokenizer, "train", batch_size=32, train=True, seed=0)
  batch = next(it)                      # dict of numpy arrays, see below
  state = it.get_state()                # JSON-serialisable; goes into the checkpoint
  it.set_state(state)                   # resumes with the identical next batches

``data_cfg`` fields are documented in :mod:`research.data.registry`. How a split is read and
tokenized is the task kind's: pass its encoder (``research.tasks.get(kind).encoder``, a
:class:`~research.data.tokenize.SplitEncoder`) as ``encoder=``; the default,
:class:`~research.data.tokenize.TextEncoder`, reads texts or text pairs with one class label
each. Batches (int32 unless noted) hold ``input_ids``, ``attention_mask``, ``token_type_ids``
[B, T], the encoder's fields (``labels`` [B] for text classification, float32 for scores,
[B, T] with ``-100`` where ignored for tagging; ``decoder_input_ids``,
``decoder_attention_mask`` for seq2seq), and always ``example_mask`` [B] float32: 0 on rows
that only pad the last evaluation batch.

``B = batch_size // process_count``: ``batch_size`` is global and every process gets a disjoint
slice of each global batch. ``T`` is a bucket length of ``data_cfg.buckets``. Training iterators
shuffle with ``seed`` and repeat for ``num_epochs`` (None = forever); evaluation iterators make
one pass in data order. The iterator is a grain ``MapDataset`` over batch indices, so its state
is the index of the next batch. ``it.stats.padding_fraction`` reports the padding of the batches
delivered so far, ``it.planned_padding_fraction(epoch)`` that of a whole epoch (also logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

import ml_collections
import numpy as np

from research.data import batching, iterators, packing, registry, sources, tokenize

_MEMORY_CACHE: dict[str, tokenize.Tokenized] = {}
_CACHE_LOCK = threading.Lock()


DEFAULT_ENCODER = tokenize.TextEncoder()


def _checked(
  data_cfg: ml_collections.ConfigDict, encoder: tokenize.SplitEncoder | None
) -> tokenize.SplitEncoder:
  encoder = DEFAULT_ENCODER if encoder is None else encoder
  registry.validate(data_cfg)
  encoder.check_data(data_cfg)
  return encoder


def label_names(
  data_cfg: ml_collections.ConfigDict, encoder: tokenize.SplitEncoder | None = None
) -> list[str]:
  """The label names ``encoder`` reads from the data set (index = label id in batches).

  Class names for text classification (the default encoder), tag names in
  ``data_cfg.tag_scheme`` for tagging, ``[]`` where labels are not names (scores, target
  tokens). Local data sets are prepared first if needed.
  """
  encoder = _checked(data_cfg, encoder)
  builder = sources.get_builder(data_cfg, prepare=data_cfg.source == "local")
  return encoder.label_names(data_cfg, builder.info.features)


def _num_examples(builder: Any, split: str) -> int:
  splits = builder.info.splits
  known = sources.split_name(split) in list(splits.keys())
  return int(splits[split].num_examples) if known else -1


def _cache_key(
  data_cfg: ml_collections.ConfigDict,
  builder: Any,
  split: str,
  tokenizer: Any,
  encoder: tokenize.SplitEncoder,
) -> str:
  meta = dict(builder.info.metadata or {})
  fields = dict(
    format=tokenize.FORMAT_VERSION,
    tfds=builder.info.full_name,
    data_dir=str(builder.data_dir),
    split=split,
    examples=_num_examples(builder, split),
    inputs=meta.get("inputs"),
    encoding=encoder.encoding,
    keys=encoder.columns(data_cfg),
    tag_scheme=data_cfg.tag_scheme,
    max_length=data_cfg.max_length,
    target_max_length=data_cfg.target_max_length,
    tokenizer=tokenize.tokenizer_fingerprint(tokenizer),
  )
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def tokenized_split(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Any,
  split: str,
  encoder: tokenize.SplitEncoder | None = None,
) -> tokenize.Tokenized:
  """The whole ``split`` tokenized by ``encoder`` (memory and disk cached); prepares the data
  set if needed."""
  encoder = _checked(data_cfg, encoder)
  builder = sources.get_builder(data_cfg)
  sources.check_split(builder, split)
  # Only prepared data is cached: a data set served by tfds.testing.mock_data is not on disk
  # and may differ from call to call.
  cacheable = sources.is_prepared(builder)
  key = _cache_key(data_cfg, builder, split, tokenizer, encoder)
  with _CACHE_LOCK:
    if cacheable and key in _MEMORY_CACHE:
      return _MEMORY_CACHE[key]
  path = sources.data_dir(data_cfg) / "tokenized" / f"{data_cfg.name}-{split}-{key}.npz"
  on_disk = cacheable and data_cfg.cache_tokenized
  if on_disk and path.exists():
    tok = tokenize.load(path)
  else:
    features = builder.info.features
    columns = sources.read_columns(builder, split, encoder.columns(data_cfg))
    tok = encoder.encode(data_cfg, tokenizer, columns, features)
    if on_disk:
      tokenize.save(tok, path)
  if len(tok) == 0:
    raise ValueError(f"{data_cfg.name}[{split}] has no examples.")
  if int(tok.lengths.max()) > data_cfg.buckets[-1]:
    raise ValueError(f"{data_cfg.name}: a row of {tok.lengths.max()} tokens exceeds the buckets.")
  if cacheable:
    with _CACHE_LOCK:
      _MEMORY_CACHE[key] = tok
  return tok


class DataIterator(iterators.GrainIterator):
  """A checkpointable iterator of numpy batches (see module docstring).

  Attributes:
    num_examples: examples in the split.
    num_batches: batches per epoch (train) or in the single pass (eval).
    stats: padding statistics of the batches delivered so far.
  """

  def __init__(
    self,
    tok: tokenize.Tokenized,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
    data_cfg: ml_collections.ConfigDict,
    split: str,
  ):
    self._slice = process_slice(batch_size, process_index, process_count)
    self._tok = tok
    self._buckets = tuple(data_cfg.buckets)
    self._train = train
    self._seed = seed
    self._batch_size = batch_size
    self._pool_batches = data_cfg.pool_batches
    self._plans: dict[int, np.ndarray] = {}
    self._plan_lock = threading.Lock()
    self.num_examples = len(tok)
    # Packed training rows (research.data.packing): fixed by the seed, shuffled per epoch.
    self._packed: np.ndarray | None = None
    if train and data_cfg.get("packing", False):
      width = batching.bucket_of(data_cfg.max_length, self._buckets)
      self._packed = packing.pack(tok.lengths, width, data_cfg.packing_max_per_row, seed)
      num_batches = len(self._packed) // batch_size
      if num_batches == 0:
        raise ValueError(
          f"{data_cfg.name}[{split}]: {len(self._packed)} packed rows < batch_size {batch_size}."
        )
    elif train:
      num_batches = self.num_examples // batch_size
      if num_batches == 0:
        raise ValueError(
          f"{data_cfg.name}[{split}]: {len(tok)} examples < batch_size {batch_size}."
        )
    else:
      self._eval_plan = batching.eval_plan(self.num_examples, batch_size)
      num_batches = len(self._eval_plan)
    fingerprint = dict(
      data=data_cfg.name,
      split=split,
      examples=self.num_examples,
      batch_size=batch_size,
      process_count=process_count,
      train=train,
      seed=seed if train else 0,
      num_epochs=num_epochs if train else 1,
      buckets=list(self._buckets),
      pool_batches=self._pool_batches if train else 0,
    )
    if self._packed is not None:  # Only when on, so unpacked checkpoints keep their state.
      fingerprint.update(packing=True, packing_max_per_row=data_cfg.packing_max_per_row)
    super().__init__(
      self._make_batch,
      num_batches=num_batches,
      num_epochs=num_epochs if train else 1,
      fingerprint=fingerprint,
      num_threads=data_cfg.num_threads,
      prefetch=data_cfg.prefetch,
    )

  def _plan(self, epoch: int) -> np.ndarray:
    if not self._train:
      return self._eval_plan
    # grain calls from several threads, and on a small data set their batches can span several
    # epochs: keep a few recent plans, and never drop the one being returned.
    with self._plan_lock:
      plan = self._plans.get(epoch)
      if plan is None:
        if self._packed is not None:  # Row indices into self._packed.
          plan = packing.epoch_plan(len(self._packed), self._batch_size, self._seed, epoch)
        else:
          plan = batching.train_plan(
            self._tok.lengths, self._batch_size, self._seed, epoch, self._pool_batches
          )
        self._plans[epoch] = plan
        for old in sorted(self._plans)[:-4]:
          if old != epoch:
            del self._plans[old]
      return plan

  def planned_padding_fraction(self, epoch: int = 0) -> float:
    """Fraction of padded token slots over all batches of an epoch (real rows only)."""
    if self._packed is not None:
      plan = self._plan(epoch)
      lengths = packing.row_lengths(self._tok.lengths, self._packed)
      padded = sum(batching.bucket_of(int(lengths[b].max()), self._buckets) * len(b) for b in plan)
      return 1.0 - float(lengths[plan].sum()) / max(padded, 1)
    return batching.padding_fraction(self._tok, self._plan(epoch), self._buckets)

  def _make_batch(self, index: int) -> dict[str, np.ndarray]:
    epoch, j = divmod(index, self.num_batches)
    rows = self._plan(epoch)[j]
    if self._packed is not None:  # Global rows' bucket, so every process pads alike.
      packed = self._packed[rows]
      lengths = packing.row_lengths(self._tok.lengths, packed)
      length = batching.bucket_of(int(lengths.max()), self._buckets)
      return packing.assemble(self._tok, packed[self._slice], length)
    length = batching.padded_length(self._tok, rows, self._buckets)
    return batching.assemble(self._tok, rows[self._slice], int(rows[0]), length)


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of a global batch.

  Raises:
    ValueError: if the batch does not split evenly or the index is out of range.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def build_iterator(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Any,
  split: str,
  *,
  batch_size: int,
  train: bool,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  encoder: tokenize.SplitEncoder | None = None,
) -> DataIterator:
  """A checkpointable iterator of padded numpy batches over ``split`` (see module docstring).

  Args:
    data_cfg: the data set's ConfigDict (:func:`research.data.registry.default_data_config`).
    tokenizer: a fast ``transformers`` tokenizer.
    split: a split of the data set, e.g. ``data_cfg.splits.train``.
    batch_size: the GLOBAL batch size; each process yields ``batch_size // process_count`` rows.
    train: shuffle and repeat (True), or one ordered pass padded to full batches (False).
    seed: shuffling seed (train only); all processes must pass the same seed.
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    num_epochs: training epochs, None = forever; ignored for evaluation.
    encoder: how the task kind reads and tokenizes the split (default: texts with class
      labels, :class:`~research.data.tokenize.TextEncoder`).

  Returns:
    A :class:`DataIterator`.

  Raises:
    ValueError: on an unknown split, inconsistent sizes, or a malformed config.
    FileNotFoundError / InputError: for missing or malformed raw files.
  """
  tok = tokenized_split(data_cfg, tokenizer, split, encoder)
  it = DataIterator(
    tok,
    batch_size=batch_size,
    train=train,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
    data_cfg=data_cfg,
    split=split,
  )
  logging.info(
    "%s[%s]: %d examples, %d batches of %d, buckets %s, padding fraction %.3f (%s), %s",
    data_cfg.name,
    split,
    it.num_examples,
    it.num_batches,
    batch_size,
    tuple(data_cfg.buckets),
    it.planned_padding_fraction(),
    "epoch 0" if train else "one pass",
    tok.stats,
  )
  return it

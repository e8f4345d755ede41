"""N-way K-shot episodes for meta-learning, over a labelled data set and a class split.

:class:`EpisodeSampler` draws episode ``i`` from ``np.random.default_rng([seed, i])``: ``n_way``
classes of the split, then ``k_shot`` support and ``q_query`` query examples per class, disjoint.
Episodes are therefore reproducible and random-access (an iterator position is one integer),
and support labels are ``0..n_way-1`` in the order of the drawn classes.

:func:`build_episode_iterator` tokenizes the data set once and yields batches of episodes as
fixed-shape arrays (``[E, n_way * k_shot, T]`` support, ``[E, n_way * q_query, T]`` query), so a
batch of episodes can be ``vmap``-ped; ``T`` is a bucket of ``data_cfg.buckets`` (the longest
row of the batch decides), so jit sees at most ``len(buckets)`` shapes.

Class splits: BANKING77 and CLINC150 come with ProtAugment's published meta-train / meta-valid /
meta-test classes (``few_shot/NN/labels.{train,valid,test}.txt``), stored with the prepared data
set; :func:`class_splits` returns those of ``data_cfg.few_shot.run``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from research.data import batching, input_pipeline, iterators, sources


@dataclasses.dataclass(frozen=True)
class Episode:
  """Indices into the data set and episode-local labels of one episode."""

  support: np.ndarray  # [n_way * k_shot] example indices
  support_labels: np.ndarray  # [n_way * k_shot] in 0..n_way-1
  query: np.ndarray  # [n_way * q_query]
  query_labels: np.ndarray  # [n_way * q_query]
  classes: np.ndarray  # [n_way] data-set class ids; support label j is classes[j]


class EpisodeSampler:
  """Seeded N-way K-shot (+Q query) episodes over the classes ``classes`` of ``labels``.

  Args:
    labels: [num_examples] class id of every example of the data set.
    classes: the class ids episodes may draw (one class split).
    n_way, k_shot, q_query: classes per episode, support and query examples per class.
    seed: episodes are a pure function of ``(seed, index)``.
    class_names: names for error messages (index = class id).
    split_name: the class split's name for error messages.

  Raises:
    ValueError: if the split has fewer than ``n_way`` classes, or any of its classes fewer than
      ``k_shot + q_query`` examples (all such classes are named with their counts).
  """

  def __init__(
    self,
    labels: np.ndarray,
    classes: Sequence[int],
    *,
    n_way: int,
    k_shot: int,
    q_query: int,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    split_name: str = "",
  ):
    if n_way < 1 or k_shot < 1 or q_query < 0:
      raise ValueError(
        f"Need n_way >= 1, k_shot >= 1, q_query >= 0; got {n_way}, {k_shot}, {q_query}."
      )
    labels = np.asarray(labels)
    self.classes = np.asarray(sorted(set(int(c) for c in classes)), dtype=np.int64)
    where = f"class split {split_name!r}" if split_name else "the class split"
    if n_way > len(self.classes):
      raise ValueError(f"n_way={n_way} but {where} has only {len(self.classes)} classes.")
    name = (lambda c: class_names[c]) if class_names is not None else str
    self._members = {int(c): np.flatnonzero(labels == c) for c in self.classes}
    need = k_shot + q_query
    short = [(name(c), len(m)) for c, m in self._members.items() if len(m) < need]
    if short:
      listed = ", ".join(f"{n!r} has {k}" for n, k in short)
      raise ValueError(
        f"{where}: k_shot={k_shot} + q_query={q_query} = {need} examples needed per class, but "
        f"{listed} example(s)."
      )
    self.n_way, self.k_shot, self.q_query, self.seed = n_way, k_shot, q_query, seed

  def sample(self, index: int) -> Episode:
    """Episode number ``index`` (same seed and index -> same episode)."""
    rng = np.random.default_rng([self.seed, index])
    chosen = rng.choice(self.classes, size=self.n_way, replace=False)
    support, query = [], []
    for c in chosen:
      picked = rng.choice(self._members[int(c)], size=self.k_shot + self.q_query, replace=False)
      support.append(picked[: self.k_shot])
      query.append(picked[self.k_shot :])
    ways = np.arange(self.n_way, dtype=np.int32)
    return Episode(
      support=np.concatenate(support),
      support_labels=np.repeat(ways, self.k_shot),
      query=np.concatenate(query) if self.q_query else np.zeros(0, np.int64),
      query_labels=np.repeat(ways, self.q_query),
      classes=chosen.astype(np.int32),
    )


def class_splits(data_cfg: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """The published class split ``data_cfg.few_shot.run``: ``{"train"|"valid"|"test": names}``.

  Raises:
    ValueError: if the data set has no such class split; also if splits share a class.
  """
  builder = sources.get_builder(data_cfg)
  runs = dict(builder.info.metadata or {}).get("class_splits") or {}
  run = data_cfg.few_shot.run
  if run not in runs:
    raise ValueError(f"{data_cfg.name} has no class split run {run!r}; available: {sorted(runs)}.")
  splits = {k: list(v) for k, v in runs[run].items()}
  seen: dict[str, str] = {}
  for split, names in splits.items():
    for n in names:
      if n in seen:
        raise ValueError(f"{data_cfg.name} run {run}: class {n!r} in splits {seen[n]} and {split}.")
      seen[n] = split
  return splits


def _assemble(tok: Any, rows: np.ndarray, length: int, prefix: str) -> dict[str, np.ndarray]:
  """Pads ``rows`` [E, M] of examples to ``length``; keys get ``prefix``."""
  e, m = rows.shape
  flat = batching.assemble(tok, rows.reshape(-1), int(rows.flat[0]), length)
  keep = ("input_ids", "attention_mask", "token_type_ids")
  return {f"{prefix}{k}": flat[k].reshape(e, m, length) for k in keep}


class EpisodeIterator(iterators.GrainIterator):
  """Batches of episodes as fixed-shape arrays, with a checkpointable position."""

  def __init__(
    self,
    tok: Any,
    sampler: EpisodeSampler,
    *,
    buckets: Sequence[int],
    episodes_per_batch: int,
    process_index: int,
    process_count: int,
    num_batches: int | None,
    fingerprint: dict[str, Any],
    num_threads: int,
    prefetch: int,
  ):
    self._tok, self._sampler, self._buckets = tok, sampler, tuple(buckets)
    self._per_batch = episodes_per_batch
    self._slice = input_pipeline.process_slice(episodes_per_batch, process_index, process_count)
    super().__init__(
      self._make_batch,
      num_batches=num_batches or 1,
      num_epochs=1 if num_batches else None,
      fingerprint=fingerprint,
      num_threads=num_threads,
      prefetch=prefetch,
    )

  def _make_batch(self, index: int) -> dict[str, np.ndarray]:
    eps = [self._sampler.sample(index * self._per_batch + e) for e in range(self._per_batch)]
    every = np.concatenate([np.concatenate([ep.support, ep.query]) for ep in eps])
    length = batching.padded_length(self._tok, every, self._buckets)  # global: same on all hosts
    eps = eps[self._slice]
    support = np.stack([ep.support for ep in eps])
    batch = _assemble(self._tok, support, length, "support_")
    batch["support_labels"] = np.stack([ep.support_labels for ep in eps])
    if self._sampler.q_query:
      batch.update(_assemble(self._tok, np.stack([ep.query for ep in eps]), length, "query_"))
      batch["query_labels"] = np.stack([ep.query_labels for ep in eps])
    batch["classes"] = np.stack([ep.classes for ep in eps])
    return batch

  def _update_stats(self, batch: dict[str, np.ndarray]) -> None:
    self.stats.update(batch, "support_")
    if "query_input_ids" in batch:
      self.stats.update(batch, "query_")


def build_episode_iterator(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Any,
  class_split: str,
  *,
  n_way: int,
  k_shot: int,
  q_query: int,
  episodes_per_batch: int = 1,
  seed: int = 0,
  split: str = "",
  process_index: int = 0,
  process_count: int = 1,
  num_batches: int | None = None,
) -> EpisodeIterator:
  """Batches of N-way K-shot episodes over one published class split of an intent data set.

  Args:
    data_cfg: an intent data set's ConfigDict (``banking77``, ``clinc150``).
    tokenizer: a fast ``transformers`` tokenizer.
    class_split: ``'train'``, ``'valid'`` or ``'test'`` classes of ``data_cfg.few_shot.run``.
    n_way, k_shot, q_query: episode shape.
    episodes_per_batch: GLOBAL episodes per batch; each process gets its slice.
    seed: episode seed; use different seeds (or class splits) for meta-train and evaluation.
    split: the data split holding the examples (default ``data_cfg.splits.train``).
    process_index, process_count: this process and the number of processes.
    num_batches: batches to yield (e.g. a fixed evaluation set); None = forever.

  Returns:
    An :class:`EpisodeIterator` yielding ``support_{input_ids,attention_mask,token_type_ids}``
    [E, N*K, T], ``support_labels`` [E, N*K], the same for ``query_`` with N*Q rows, and
    ``classes`` [E, N] (data-set class ids), int32.

  Raises:
    ValueError: unknown class split; n_way larger than its classes; a class with fewer than
      k_shot + q_query examples (named, with its count).
  """
  splits = class_splits(data_cfg)
  if class_split not in splits:
    raise ValueError(f"Unknown class split {class_split!r}; expected one of {sorted(splits)}.")
  names = input_pipeline.label_names(data_cfg)
  ids = {n: i for i, n in enumerate(names)}
  split = split or data_cfg.splits.train
  tok = input_pipeline.tokenized_split(data_cfg, tokenizer, split)
  sampler = EpisodeSampler(
    tok.scalars["labels"],
    [ids[n] for n in splits[class_split]],
    n_way=n_way,
    k_shot=k_shot,
    q_query=q_query,
    seed=seed,
    class_names=names,
    split_name=f"{data_cfg.name}/{data_cfg.few_shot.run}/{class_split}",
  )
  fingerprint = dict(
    data=data_cfg.name,
    run=data_cfg.few_shot.run,
    class_split=class_split,
    shape=[n_way, k_shot, q_query],
    episodes_per_batch=episodes_per_batch,
    process_count=process_count,
    seed=seed,
    num_batches=num_batches,
  )
  return EpisodeIterator(
    tok,
    sampler,
    buckets=data_cfg.buckets,
    episodes_per_batch=episodes_per_batch,
    process_index=process_index,
    process_count=process_count,
    num_batches=num_batches,
    fingerprint=fingerprint,
    num_threads=data_cfg.num_threads,
    prefetch=data_cfg.prefetch,
  )

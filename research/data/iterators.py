"""A checkpointable batch iterator: a grain ``MapDataset`` over batch indices.

Each batch is a pure function of its index (``make_batch(i)``), so the whole iterator position is
grain's ``{"next_index": i}``; grain reads ahead with threads and a prefetch buffer. The state
also carries a fingerprint of how the iterator was built, so restoring into an iterator over
other data or settings fails loudly instead of silently changing the trajectory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

STATE_VERSION = 1


@dataclasses.dataclass
class PaddingStats:
  """Token slots delivered so far: real tokens vs all slots of real rows."""

  real_tokens: int = 0
  slots: int = 0
  shapes: set[tuple[int, ...]] = dataclasses.field(default_factory=set)

  @property
  def padding_fraction(self) -> float:
    return 1.0 - self.real_tokens / max(self.slots, 1)

  def update(self, batch: dict[str, np.ndarray], prefix: str = "") -> None:
    """Counts the real rows of a batch (``example_mask`` > 0), encoder and decoder side."""
    ids = batch[f"{prefix}input_ids"]
    self.shapes.add(ids.shape)
    mask = batch.get(f"{prefix}example_mask")
    real = mask > 0 if mask is not None else np.ones(ids.shape[:-1], bool)
    if real.ndim == 2:  # Packed rows (research.data.packing): a row is real if it holds one.
      real = real.any(axis=1)
    for key in ("attention_mask", "decoder_attention_mask"):
      if f"{prefix}{key}" in batch:
        self.real_tokens += int(batch[f"{prefix}{key}"][real].sum())
        self.slots += int(real.sum()) * ids.shape[-1]


class GrainIterator:
  """Iterates ``make_batch(0), make_batch(1), ...`` with a JSON-serialisable position.

  Args:
    make_batch: index -> batch; must be deterministic and thread-safe.
    num_batches: batches per pass.
    num_epochs: passes; None = forever.
    fingerprint: JSON-serialisable description of the iterator, checked by :meth:`set_state`.
    num_threads, prefetch: grain read threads and prefetch buffer size.
  """

  def __init__(
    self,
    make_batch: Callable[[int], dict[str, np.ndarray]],
    *,
    num_batches: int,
    num_epochs: int | None,
    fingerprint: dict[str, Any],
    num_threads: int = 2,
    prefetch: int = 4,
  ):
    self.num_batches = num_batches
    self.stats = PaddingStats()
    self._fingerprint = {"version": STATE_VERSION, **fingerprint}
    ds = grain.MapDataset.range(num_batches)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(lambda i, _: make_batch(i))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._it = iter(ds.to_iter_dataset(options))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._update_stats(batch)
    return batch

  def _update_stats(self, batch: dict[str, np.ndarray]) -> None:
    self.stats.update(batch)

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict (batches delivered so far + a fingerprint)."""
    return {"grain": self._it.get_state(), **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by :meth:`get_state` of an identically built iterator.

    Raises:
      ValueError: if the state was saved by an iterator over other data or settings.
    """
    diff = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
    if diff:
      raise ValueError(f"Iterator state does not match this iterator (saved, now): {diff}.")
    self._it.set_state(state["grain"])

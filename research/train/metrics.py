"""Where a run's numbers go: metrics.jsonl, TensorBoard event files and a tqdm progress bar.

Only process 0 writes (``enabled=False`` elsewhere). ``metrics.jsonl`` holds one JSON object
per logged event with ``step``, ``split`` and the metric names, the contract in DESIGN.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def peak_memory() -> dict[str, Any]:
  """The run's peak memory for results.json: ``{'peak_memory_mb': x, 'peak_memory_kind': k}``.

  On accelerators the largest ``peak_bytes_in_use`` over this process's devices (``device``);
  on CPU, where XLA's buffers live in host memory, the process's peak resident set size
  (``host_rss``: everything the process holds, data pipeline included).
  """
  import jax

  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return {"peak_memory_mb": max(peaks) / 2**20, "peak_memory_kind": "device"}
  import resource

  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux.
  return {"peak_memory_mb": rss_kb / 1024, "peak_memory_kind": "host_rss"}


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN; keep it readable.
  return value


class MetricWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and ``workdir/tb``; drives the progress bar."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    total_steps: int,
    initial_step: int = 0,
    enabled: bool = True,
    progress: bool = True,
  ):
    self.enabled = enabled
    self.workdir = Path(workdir)
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not enabled:
      return
    self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.workdir / "tb"))
    except ImportError:
      self._tb = None
    if progress:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total_steps,
        initial=initial_step,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=None,
        mininterval=1.0,
      )

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def advance(self, steps: int, **postfix: float) -> None:
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def print(self, message: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)
    else:
      print(message, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()

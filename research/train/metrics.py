"""Where a run's numbers go: metrics.jsonl, TensorBoard event files and a tqdm progress bar.

Only process 0 writes (``enabled=False`` elsewhere). ``metrics.jsonl`` holds one JSON object
per logged event with ``step``, ``split`` and the metric names (the run-directory contract of
docs/design.md). Progress goes to stderr: a tqdm bar on a terminal, and where stderr is not one
(a SLURM log, a redirected run) a plain line every ``progress_every_s`` seconds with the step,
examples per second, the ETA (compilation excluded: the rate is measured from the first logged
window on) and the last loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
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


@dataclasses.dataclass
class _Progress:
  """Where the plain progress lines stand (rates count from the end of the first window)."""

  total: int
  step: int
  every_s: float
  t_start: float | None = None
  step_start: int = 0
  examples: float = 0.0
  t_printed: float = 0.0


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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
    progress_every_s: float = 60.0,
  ):
    self.enabled = enabled
    self.workdir = Path(workdir)
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._lines: _Progress | None = None  # Plain progress lines (stderr not a terminal).
    if not enabled:
      return
    self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.workdir / "tb"))
    except ImportError:
      self._tb = None
    if progress and not sys.stderr.isatty():
      self._lines = _Progress(total_steps, initial_step, progress_every_s)
    elif progress:
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

  def drop_after(self, step: int) -> None:
    """Removes the records of steps after ``step`` (a run resumed at ``step`` logs them again),
    so metrics.jsonl holds one trajectory."""
    path = self.workdir / "metrics.jsonl"
    if not self.enabled or not path.stat().st_size:
      return
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
      lines[-1] = ""  # A record cut short by a kill mid-write: it is logged again.
    keep = [x for x in lines if x and json.loads(x).get("step", 0) <= step]
    if len(keep) < len(lines):
      self._jsonl.close()
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(keep))
      tmp.replace(path)
      self._jsonl = open(path, "a")  # noqa: SIM115 (closed in close())

  def advance(self, steps: int, examples: float = 0.0, **postfix: float) -> None:
    """Moves the progress on by ``steps`` (of ``examples`` examples) after a logged window."""
    if self._lines is not None:
      self._plain_progress(steps, examples, postfix)
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def _plain_progress(self, steps: int, examples: float, postfix: dict[str, float]) -> None:
    p, now = self._lines, time.time()
    p.step += steps
    if p.t_start is None:  # The first window holds the compilations: the rate starts after it.
      p.t_start, p.step_start, p.t_printed = now, p.step, now
      return
    p.examples += examples
    if now - p.t_printed < p.every_s and p.step < p.total:
      return
    p.t_printed = now
    elapsed = max(now - p.t_start, 1e-9)
    rate = (p.step - p.step_start) / elapsed
    eta = (p.total - p.step) / rate if rate > 0 else float("inf")
    shown = "".join(f", {k} {v:.4g}" for k, v in postfix.items())
    print(
      f"step {p.step}/{p.total} ({100 * p.step / max(p.total, 1):.0f}%), "
      f"{p.examples / elapsed:.1f} examples/s, ETA {_duration(eta)}{shown}",
      file=sys.stderr,
      flush=True,
    )

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

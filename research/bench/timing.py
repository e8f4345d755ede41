"""How every benchmark here times its sides: alternate them over rounds, take medians.

A benchmark compares two or more sides (ours and a peer, or several variants) in one process.
Running them round by round, each side once per round, makes load from other jobs on a shared
machine hit every side alike, where timing one side fully and then the next would charge a
burst to whichever ran during it; the median over rounds then ignores the odd slow round. The
1-minute load average before and after goes into the output, so a reader can tell a quiet
machine from a busy one. The benchmarks keep their own tables and last ``key=value`` lines.

Only the standard library is imported at the top (jax inside the functions): the Flax peer
worker (flax4_peer.py) runs in another venv without this package and imports this file as its
sibling.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def per_call(fn: Callable[[], Any], n: int, wait: Callable[[Any], Any] | None = None) -> float:
  """Seconds per call of ``fn`` over ``n`` calls, waiting for the last call's result.

  JAX (and PyTorch on CUDA) dispatch asynchronously, so only waiting for the result, once at
  the end as the trainer's loop does when it logs, makes the time cover the work.

  Args:
    fn: one step.
    n: how many steps.
    wait: called on the last result, inside the timing (default ``jax.block_until_ready``,
      which passes over results that are not jax arrays).
  """
  if wait is None:
    import jax

    wait = jax.block_until_ready
  start = time.perf_counter()
  for _ in range(n):
    out = fn()
  wait(out)
  return (time.perf_counter() - start) / n


def alternate(sides: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Runs each side once per round, in order, for ``rounds`` rounds.

  Args:
    sides: name -> a call that runs that side's steps for one round and returns its seconds
      per step (e.g. ``lambda: per_call(step, 2)``).
    rounds: how many rounds.

  Returns:
    name -> its per-round seconds per step, in round order.
  """
  times: dict[str, list[float]] = {name: [] for name in sides}
  for _ in range(rounds):
    for name, run in sides.items():
      times[name].append(run())
  return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
  """name -> the median of its rounds."""
  return {name: statistics.median(ts) for name, ts in times.items()}


def ratio(times: Mapping[str, list[float]], slow: str, fast: str) -> float:
  """``median(slow) / median(fast)``: how many times faster ``fast`` is (a speedup line)."""
  return statistics.median(times[slow]) / statistics.median(times[fast])


def load() -> float:
  """The machine's 1-minute load average now (take one before the benchmark starts)."""
  return os.getloadavg()[0]


def load_line(before: float) -> str:
  """``load avg (1 min) before/after: B/A``, with the load now as the after figure."""
  return f"load avg (1 min) before/after: {before:.2f}/{load():.2f}"


def machine_line(before: float) -> str:
  """The device, its count, the CPUs and :func:`load_line`: what the timings ran on."""
  import jax

  dev = jax.devices()[0]
  return (
    f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, cpus: {os.cpu_count()}, "
    f"{load_line(before)}"
  )

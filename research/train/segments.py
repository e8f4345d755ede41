"""A run's segments: the figures of each process that trained it, so results.json totals them.

A run killed, preempted or stopped and then rerun is trained by several processes, one
*segment* each. A process measures only itself, so before segments were kept, a resumed run's
results.json held the last segment's wall time and a ``step_time_s`` of null when that segment
logged a single window. ``workdir/segments.json`` lists every segment's figures; it is
rewritten (atomically) after each logged window and at the end, so a SIGKILL loses at most the
window in progress, and results.json reports the sums.

The sums count work done, not the trajectory: steps retrained after a crash (those after the
checkpoint it resumed from) count again, so ``trained_steps`` can exceed ``train.steps``. A run
that starts at step 0 starts the list over, as it starts metrics.jsonl over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SEGMENTS_NAME = "segments.json"


def process_start_time(fallback: float) -> float:
  """When this process started, on the ``time.time()`` clock (Linux: from /proc, to the clock
  tick); ``fallback`` where that cannot be read.

  ``/proc/self/stat`` gives the start in ticks since boot; its age against ``CLOCK_BOOTTIME``
  (the clock the kernel counts it on) avoids /proc/stat's boot time, whole seconds only.
  """
  try:
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # Field 22, starttime.
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
  except (OSError, ValueError, IndexError, AttributeError):
    return fallback
  return time.time() - age if age >= 0 else fallback


@dataclasses.dataclass
class Segment:
  """What one process trained and how long it took.

  Attributes:
    start_step / end_step: the step it started from and the last step it logged.
    steps / examples: steps and examples it trained (logged windows).
    wall_s: from the start of the process's run to its last save.
    train_s: time in its logged windows, evaluation excluded, compilation included.
    timed_s / timed_steps / timed_examples: the same over the windows after its first (which
      holds the compilations), the basis of the rates.
    time_to_first_step_s: from the process's start to the end of its first step (imports,
      data, restore or init, compilation or the compilation cache's loads, the step itself);
      None before that step. Not summed: each process waits for its own.
  """

  start_step: int
  end_step: int
  steps: int = 0
  examples: float = 0.0
  wall_s: float = 0.0
  train_s: float = 0.0
  timed_s: float = 0.0
  timed_steps: int = 0
  timed_examples: float = 0.0
  time_to_first_step_s: float | None = None


class Segments:
  """The run's earlier segments (from ``segments.json``) and the one this process trains."""

  def __init__(self, workdir: Path, start_step: int, t_start: float, enabled: bool = True):
    """
    Args:
      workdir: the run directory.
      start_step: the step this process resumes from (0: a fresh start drops earlier ones).
      t_start: when this process's run started (``time.time()``), for its wall time.
      enabled: False on processes that do not write (they total their own segment only).
    """
    self.path = workdir / SEGMENTS_NAME
    self.enabled = enabled
    self.t_start = t_start
    self.previous: list[Segment] = []
    if enabled and start_step > 0 and self.path.is_file():
      try:
        self.previous = [Segment(**s) for s in json.loads(self.path.read_text())]
      except (ValueError, TypeError) as e:  # Not ours, or from another version: start over.
        print(f"warning: ignoring unreadable {self.path} ({e})", file=sys.stderr)
    self.current = Segment(start_step, start_step)

  def window(self, done: int, steps: int, examples: float, seconds: float, timed: bool) -> None:
    """Adds a logged window of ``steps`` steps ending at step ``done``; ``timed`` when it is not
    the segment's first."""
    s = self.current
    s.end_step, s.steps, s.examples, s.train_s = (
      done,
      s.steps + steps,
      s.examples + examples,
      s.train_s + seconds,
    )
    if timed:
      s.timed_s += seconds
      s.timed_steps += steps
      s.timed_examples += examples

  def first_step_done(self) -> None:
    """Records :attr:`Segment.time_to_first_step_s` now: call it once the first step's results
    are ready (blocked on: dispatch returns before the step has run)."""
    self.current.time_to_first_step_s = time.time() - process_start_time(self.t_start)

  def all(self) -> list[Segment]:
    return [*self.previous, self.current]

  def save(self) -> None:
    """Writes ``segments.json`` (temporary file, then rename: a kill leaves the old list)."""
    self.current.wall_s = time.time() - self.t_start
    if not self.enabled:
      return
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    tmp.write_text(json.dumps([dataclasses.asdict(s) for s in self.all()], indent=1) + "\n")
    os.replace(tmp, self.path)

  def totals(self) -> dict[str, Any]:
    """results.json's timing fields, summed over every segment.

    ``train_examples_per_sec`` and ``step_time_s`` come from the windows after each segment's
    first; when no segment logged a second window, from all of them (compilation included), so
    they are null only when no step was trained.
    """
    segs = self.all()
    summed = [f.name for f in dataclasses.fields(Segment) if f.name != "time_to_first_step_s"]
    total = {name: sum(getattr(s, name) for s in segs) for name in summed}
    seconds, steps, examples = total["timed_s"], total["timed_steps"], total["timed_examples"]
    if not steps:
      seconds, steps, examples = total["train_s"], total["steps"], total["examples"]
    return {
      "train_examples_per_sec": examples / seconds if steps and seconds else None,
      "step_time_s": seconds / steps if steps else None,
      "wall_s": total["wall_s"],
      "time_to_first_step_s": self.current.time_to_first_step_s,
      "train_s": total["train_s"],
      "trained_steps": total["steps"],
      "train_examples": total["examples"],
      "segments": [dataclasses.asdict(s) for s in segs],
    }

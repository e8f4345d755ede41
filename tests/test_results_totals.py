"""results.json of a resumed run totals every segment (each process that trained the run).

A crash after step 6 with the last checkpoint at 6 makes two segments: the crashed
one (logged to step 6) and the resumed one (from the checkpoint to the end). results.json must
hold their sums, read back from ``segments.json``, and a ``step_time_s`` that is a number even
when the last segment logged a single window (before, it held the last segment only: null).
"""

from __future__ import annotations

import json
import math
import time

import pytest
from train_util import tiny_config

from research.train import loop
from research.train import segments as segments_lib
from research.train import trainer as _supervised  # noqa: F401 (registers the program)


class Interrupted(Exception):
  """Stands in for a crash in the middle of a run."""


def crash_at(step_to_crash: int):
  def hook(step, batch):
    if step == step_to_crash:  # Read ahead while step 5 or 6 trains.
      raise Interrupted
    return batch

  return hook


def wait_for(path, seconds=60):
  deadline = time.time() + seconds  # Checkpoints are written asynchronously.
  while not path.is_dir():
    assert time.time() < deadline, f"no {path}"
    time.sleep(0.2)


def check_totals(results: dict, workdir) -> list[dict]:
  """The totals equal the sums over the segments, which are those of segments.json."""
  segs = results["segments"]
  assert json.loads((workdir / segments_lib.SEGMENTS_NAME).read_text()) == segs

  def total(key):
    return sum(s[key] for s in segs)

  assert results["wall_s"] == pytest.approx(total("wall_s"), rel=1e-12)
  assert results["train_s"] == pytest.approx(total("train_s"), rel=1e-12)
  assert results["trained_steps"] == total("steps")
  assert results["train_examples"] == total("examples")
  assert isinstance(results["step_time_s"], float) and results["step_time_s"] > 0
  assert math.isclose(results["step_time_s"], total("timed_s") / total("timed_steps"))
  assert math.isclose(results["train_examples_per_sec"], total("timed_examples") / total("timed_s"))
  assert all(s["wall_s"] >= s["train_s"] >= s["timed_s"] >= 0 for s in segs)
  return segs


def test_results_total_every_segment_after_crash_and_resume(tmp_path):
  config = tiny_config(steps=8, log_every=2, checkpoint_every=6, eval_every=0)
  with pytest.raises(Interrupted):
    loop.train_and_evaluate(config, str(tmp_path), batch_hook=crash_at(7))
  wait_for(tmp_path / "checkpoints" / "6")
  time.sleep(1.0)
  crashed = json.loads((tmp_path / segments_lib.SEGMENTS_NAME).read_text())
  assert [(s["start_step"], s["end_step"], s["steps"]) for s in crashed] == [(0, 6, 6)]
  config = tiny_config(steps=8, log_every=2, checkpoint_every=6, eval_every=0)
  results = loop.train_and_evaluate(config, str(tmp_path))
  segs = check_totals(results, tmp_path)
  assert segs[0] == {**crashed[0], "wall_s": segs[0]["wall_s"]}  # Kept as the crash left it.
  assert [(s["start_step"], s["end_step"], s["steps"]) for s in segs] == [(0, 6, 6), (6, 8, 2)]
  # Work done: 6 + 2 steps of 8 examples. The rates come from the windows after each
  # segment's first: 4 and 6 of the crashed one; the resumed one logged a single window
  # (its step_time_s alone would be null, as results.json had it before).
  assert results["trained_steps"] == 8 and results["train_examples"] == 64.0
  assert [s["timed_steps"] for s in segs] == [4, 0]


def test_results_step_time_counts_the_first_window_when_it_is_the_only_one(tmp_path):
  (tmp_path / segments_lib.SEGMENTS_NAME).write_text("[]\n")  # A leftover: a fresh run drops it.
  results = loop.train_and_evaluate(
    tiny_config(steps=2, log_every=2, checkpoint_every=2, eval_every=0), str(tmp_path)
  )
  (seg,) = results["segments"]
  assert json.loads((tmp_path / segments_lib.SEGMENTS_NAME).read_text()) == [seg]
  assert (seg["start_step"], seg["end_step"], seg["steps"], seg["timed_steps"]) == (0, 2, 2, 0)
  assert results["step_time_s"] == pytest.approx(seg["train_s"] / 2)
  assert results["train_examples_per_sec"] == pytest.approx(16 / seg["train_s"])
  assert results["wall_s"] == seg["wall_s"] >= seg["train_s"] > 0


def test_results_time_to_first_step(tmp_path):
  """results.json holds time_to_first_step_s: from the process's start (here pytest's, before
  this test) to the end of the first step, which falls between this test's start and its end."""
  t0 = time.time()
  results = loop.train_and_evaluate(
    tiny_config(steps=2, log_every=1, checkpoint_every=0, eval_every=0), str(tmp_path)
  )
  written = json.loads((tmp_path / "results.json").read_text())
  first = written["time_to_first_step_s"]
  assert first == results["time_to_first_step_s"] == results["segments"][-1]["time_to_first_step_s"]
  started = segments_lib.process_start_time(0.0)
  assert isinstance(first, float) and t0 - started < first < time.time() - started

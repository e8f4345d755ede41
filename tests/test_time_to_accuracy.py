"""The end-to-end benchmark against the transformers Trainer: both sides run, are timed from
launch, and the ratios are computed from what they reported."""

import json
import math

import pytest

from research.bench import time_to_accuracy as tta


def side(wall: float, evals: list[tuple[int, float, float]]) -> dict:
  return {"wall_s": wall, "evals": [dict(step=s, accuracy=a, wall_s=t) for s, a, t in evals]}


def test_summary_ratios_and_first_to_target():
  results = {
    0: {
      "ours": side(100.0, [(250, 0.86, 40.0), (500, 0.885, 70.0)]),
      "peer": side(150.0, [(250, 0.87, 60.0), (500, 0.89, 140.0)]),
    },
    1: {
      "ours": side(120.0, [(250, 0.881, 50.0), (500, 0.89, 90.0)]),
      "peer": side(120.0, [(250, 0.881, 25.0), (500, 0.89, 100.0)]),
    },
  }
  summary = tta.summarise(results, 0.88)
  assert summary["per_seed_equal_steps"] == [1.5, 1.0]
  assert summary["equal_steps_speedup"] == 1.25
  assert summary["per_seed_time_to_target"] == [2.0, 0.5]
  assert summary["ours_first"] == 1
  # A side that never reaches the target: no ratio for the median, and it is not first.
  results[1]["ours"]["evals"] = [dict(step=500, accuracy=0.5, wall_s=90.0)]
  summary = tta.summarise(results, 0.88)
  assert math.isnan(summary["time_to_target_speedup"])
  assert summary["ours_first"] == 1


def test_time_to_accuracy_tiny_runs_both_sides(tmp_path, capsys):
  pytest.importorskip("torch")
  tta.main(["--tiny", "--seeds=0", f"--out={tmp_path}"])
  out = capsys.readouterr().out
  lines = out.strip().splitlines()
  assert lines[-3] == "ours_first=0/1"  # Random tiny models stay far below 88%.
  assert float(lines[-2].removeprefix("equal_steps_speedup=")) > 0
  assert lines[-1] == "time_to_88_speedup=nan"
  results = json.loads((tmp_path / "results.json").read_text())
  for name in ("ours", "peer"):
    run = results["seeds"]["0"][name]
    assert [e["step"] for e in run["evals"]] == [10, 20]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in run["evals"])
    times = [e["wall_s"] for e in run["evals"]]
    assert 0 < times[0] <= times[1] <= run["wall_s"]
  assert "| 10 |" in out and "| 20 |" in out
  assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0

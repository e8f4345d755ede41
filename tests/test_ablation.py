"""The transfer ablation (configs/ablations/sst2_transfer.py): nine methods, one table, one plot.

Runs every sweep point of the ``tiny`` variant (2-layer random encoder, committed fixture) with
the real trainer, then the report: one row per method with accuracy, trainable parameters,
step time and peak memory, and the accuracy-vs-trainable-parameters plot.
"""

import csv

from train_util import load_config_module

from launch import report, sweep
from research.train.trainer import train_and_evaluate


def _set(config, key: str, value) -> None:
  *parents, last = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


def test_ablation_sweep_table_and_plot(tmp_path):
  module = load_config_module("ablations/sst2_transfer")
  points = sweep.expand(module.get_sweep("tiny"))
  assert [p.name for p in points] == [
    f"method={m}"
    for m in (
      "full",
      "probe",
      "bottom4",
      "llrd",
      "unfreeze",
      "lora",
      "adapters",
      "bitfit",
      "scratch",
    )
  ]
  root = tmp_path / "sst2_transfer_tiny"
  for point in points:
    config = module.get_config("tiny")
    for key, value in point.overrides.items():
      _set(config, key, value)
    train_and_evaluate(config, str(root / point.name))
  md = report.build(root)
  with open(root / "report.csv") as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert len(rows) == 9, md
  trainable = {p.split("=")[1]: float(r["params/trainable_mean"]) for p, r in rows.items()}
  # What each method trains, smallest first; the full, LLRD, unfreezing and scratch runs
  # train everything (gradual unfreezing only delays it).
  assert trainable["probe"] < trainable["bitfit"] < trainable["lora"] < trainable["adapters"]
  assert trainable["adapters"] < trainable["full"]
  assert trainable["probe"] < trainable["bottom4"] < trainable["full"]
  assert trainable["full"] == trainable["llrd"] == trainable["unfreeze"] == trainable["scratch"]
  for r in rows.values():
    assert 0.0 <= float(r["sst2/accuracy_mean"]) <= 1.0
    assert float(r["step_time_s_mean"]) > 0 and float(r["peak_memory_mb_mean"]) > 0
  assert (root / "plots" / "sst2_transfer_tiny__sst2_accuracy_vs_trainable.png").is_file()

"""launch.report: Markdown/CSV tables with mean ± std over seeds, and PNG plots."""

import csv
import json
from pathlib import Path

from launch import report


def _write_run(root: Path, exp: str, point: str, group: str, seed: int, acc: float, steps=(1, 2)):
  wd = root / exp / point
  wd.mkdir(parents=True)
  results = {
    "config": exp,
    "tasks": ["sst2"],
    "steps": steps[-1],
    "eval": {"sst2": {"accuracy": acc, "loss": 1 - acc}},
    "train_examples_per_sec": 1000.0 + seed,
    "wall_s": 10.0,
    "params": {"total": 5, "trainable": 3},
  }
  (wd / "results.json").write_text(json.dumps(results))
  info = {"experiment": exp, "point": point, "group": group, "seed": seed, "overrides": {}}
  (wd / "launch.json").write_text(json.dumps(info))
  with open(wd / "metrics.jsonl", "w") as f:
    for s in steps:
      f.write(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n")
    # A resumed run re-logs a step; the last record wins.
    f.write(json.dumps({"step": steps[-1], "split": "train", "loss": 0.4}) + "\n")
    f.write(json.dumps({"step": steps[-1], "split": "eval", "accuracy": acc}) + "\n")
    f.write('{"step": 3, "spl')  # a line cut off by a kill is ignored


def test_report_mean_std_over_seeds(tmp_path):
  for g, base in (("lr=1e-05", 0.80), ("lr=3e-05", 0.90)):
    for seed in (0, 1):
      _write_run(tmp_path, "sst2", f"{g},seed={seed}", g, seed, base + 0.02 * seed)
  md = report.build(tmp_path)
  table = [line for line in md.splitlines() if line.startswith("| lr=")]
  assert len(table) == 2
  assert table[0].startswith("| lr=1e-05 | 2 | 0.8100 ± 0.0141 |")
  assert table[1].startswith("| lr=3e-05 | 2 | 0.9100 ± 0.0141 |")
  header = (
    "| point | n | sst2/accuracy | sst2/loss | params/trainable | train_examples_per_sec | wall_s |"
  )
  assert header in md
  with open(tmp_path / "report.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == ["lr=1e-05", "lr=3e-05"]
  assert rows[0]["seeds"] == "0 1" and abs(float(rows[0]["sst2/accuracy_std"]) - 0.0141421) < 1e-5
  pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
  assert pngs == [
    "sst2__curves_eval.png",
    "sst2__curves_train.png",
    "sst2__sst2_accuracy.png",
    "sst2__sst2_loss.png",
  ]
  assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  assert (tmp_path / "report.md").read_text() == md


def test_report_without_launch_json_and_cli(tmp_path, capsys):
  # Plain research.main runs: group from the directory name, seed part dropped.
  for seed in (0, 1):
    _write_run(tmp_path, "exp", f"freeze=4,seed={seed}", "", seed, 0.5)
    (tmp_path / "exp" / f"freeze=4,seed={seed}" / "launch.json").unlink()
  _write_run(tmp_path, "other", "default", "default", 0, 0.7)
  out = tmp_path / "out"
  assert report.main([str(tmp_path), f"--out={out}", "--no-plots"]) == 0
  md = capsys.readouterr().out
  assert "| experiment | point | n |" in md
  assert "| exp | freeze=4 | 2 | 0.5000 ± 0.0000 |" in md
  assert "| other | default | 1 | 0.7000 |" in md
  assert (out / "report.csv").exists() and not (out / "plots").exists()


def test_report_read_metrics_dedupes_and_empty_root(tmp_path, capsys):
  _write_run(tmp_path, "e", "p", "p", 0, 0.5, steps=(1, 2, 3))
  recs = report.read_metrics(tmp_path / "e" / "p")
  assert [(r["split"], r["step"]) for r in recs] == [
    ("eval", 3),
    ("train", 1),
    ("train", 2),
    ("train", 3),
  ]
  assert recs[-1]["loss"] == 0.4
  assert report.main([str(tmp_path / "nothing")]) == 1
  assert "no results.json" in capsys.readouterr().err

"""Results report: every `results.json` under a root, as Markdown + CSV tables and PNG plots.

    python -m launch.report runs/sst2_minilm_smoke [--out DIR] [--no-plots]

Runs are grouped by sweep point with seeds averaged (`mean ± std`, sample std over seeds,
`n` = number of seeds). The grouping comes from the `launch.json` the launchers write into
each workdir; a run without one is its own point (its directory name, with any `seed=N`
part removed). Writes `report.md`, `report.csv` and `plots/*.png` (one bar chart per eval
metric with seeds as dots, and learning curves from `metrics.jsonl`, mean over seeds, one
figure per split) into `--out` (default: the root), and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch import sweep

# Top-level numbers of results.json shown after the eval metrics.
EXTRA_KEYS = ("train_examples_per_sec", "step_time_s", "wall_s", "peak_memory_mb")
TRAINABLE = "params/trainable"  # Tabled, and the x axis of the metric-vs-parameters plots.
# Eval entries that count things rather than measure them: tabled, not plotted.
COUNT_NAMES = ("examples", "count", "num_examples")


@dataclasses.dataclass
class Run:
  """One finished run.

  Attributes:
    workdir: its directory.
    experiment: experiment name.
    group: sweep point without the seed.
    seed: the seed, if known.
    metrics: flat metric name (`task/metric`, `wall_s`...) -> value.
  """

  workdir: Path
  experiment: str
  group: str
  seed: Any
  metrics: dict[str, float]


def flatten_results(results: dict) -> dict[str, float]:
  """Returns `{"<task>/<metric>": v, "train_examples_per_sec": x, "wall_s": y}`."""
  out = {}
  for task, metrics in (results.get("eval") or {}).items():
    if isinstance(metrics, dict):
      for name, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          out[f"{task}/{name}"] = float(v)
    elif isinstance(metrics, (int, float)):
      out[task] = float(metrics)
  for k in EXTRA_KEYS:
    if isinstance(results.get(k), (int, float)):
      out[k] = float(results[k])
  trainable = (results.get("params") or {}).get("trainable")
  if isinstance(trainable, (int, float)):
    out[TRAINABLE] = float(trainable)
  return out


def find_runs(root: str | Path) -> list[Run]:
  """Finds every results.json under `root` (not inside checkpoints) and loads it."""
  root = Path(root)
  runs = []
  for path in sorted(root.rglob(sweep.RESULTS_FILE)):
    if "checkpoints" in path.relative_to(root).parts:
      continue
    wd = path.parent
    try:
      results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      print(f"skipping unreadable {path}: {e}", file=sys.stderr)
      continue
    info = {}
    if (wd / sweep.POINT_FILE).is_file():
      info = json.loads((wd / sweep.POINT_FILE).read_text())
    name = wd.name if wd != root else str(results.get("config", root.name))
    group = info.get("group") or _strip_seed(name)
    experiment = info.get("experiment") or (
      wd.parent.name if wd != root else str(results.get("config", "run"))
    )
    runs.append(Run(wd, experiment, group, info.get("seed"), flatten_results(results)))
  return runs


def _strip_seed(name: str) -> str:
  parts = [p for p in name.split(",") if not re.fullmatch(r"[\w.]*seed=.*", p)]
  return ",".join(parts) or "default"


@dataclasses.dataclass
class Row:
  """One table row: a sweep point with its seeds aggregated.

  Attributes:
    experiment: experiment name.
    point: the point (group) name.
    runs: the runs averaged.
    stats: metric -> (mean, std, count).
  """

  experiment: str
  point: str
  runs: list[Run]
  stats: dict[str, tuple[float, float, int]]


def aggregate(runs: Sequence[Run]) -> tuple[list[Row], list[str]]:
  """Groups runs by (experiment, point) and computes mean and sample std per metric.

  Returns:
    The rows (in first-seen order) and the metric names (eval metrics first).
  """
  groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
  for r in runs:
    groups[(r.experiment, r.group)].append(r)
  names: list[str] = []
  for r in runs:
    names.extend(k for k in r.metrics if k not in names)
  tail = (TRAINABLE, *EXTRA_KEYS)  # Run facts after the eval metrics, in this order.
  names.sort(key=lambda k: (k in tail, tail.index(k) if k in tail else 0, k))
  rows = []
  for (exp, point), members in groups.items():
    stats = {}
    for k in names:
      vals = [m.metrics[k] for m in members if k in m.metrics and math.isfinite(m.metrics[k])]
      if vals:
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        stats[k] = (statistics.fmean(vals), std, len(vals))
    rows.append(Row(exp, point, members, stats))
  return rows, names


def _fmt(x: float) -> str:
  return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def markdown(rows: Sequence[Row], names: Sequence[str]) -> str:
  """Returns the Markdown table: one row per point, `mean ± std` over seeds."""
  multi = len({r.experiment for r in rows}) > 1
  head = (["experiment"] if multi else []) + ["point", "n", *names]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = ([r.experiment] if multi else []) + [r.point, str(len(r.runs))]
    for k in names:
      if k in r.stats:
        mean, std, n = r.stats[k]
        cells.append(f"{_fmt(mean)} ± {_fmt(std)}" if n > 1 else _fmt(mean))
      else:
        cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], names: Sequence[str], path: Path) -> None:
  """Writes one CSV row per point: experiment, point, n, seeds, `<metric>_mean`, `_std`."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      ["experiment", "point", "n", "seeds", *(f"{k}_{s}" for k in names for s in ("mean", "std"))]
    )
    for r in rows:
      seeds = " ".join(str(x.seed) for x in r.runs if x.seed is not None)
      vals = []
      for k in names:
        mean, std, _ = r.stats.get(k, (float("nan"), float("nan"), 0))
        vals += [f"{mean:.6g}", f"{std:.6g}"]
      w.writerow([r.experiment, r.point, len(r.runs), seeds, *vals])


def read_metrics(workdir: Path) -> list[dict]:
  """Reads `metrics.jsonl`, keeping the last record per (split, step) (resumed runs re-log)."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  last: dict[tuple[str, int], dict] = {}
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut off by a kill
    if isinstance(rec, dict) and "step" in rec:
      last[(str(rec.get("split", "train")), int(rec["step"]))] = rec
  return [last[k] for k in sorted(last)]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot(rows: Sequence[Row], names: Sequence[str], out: Path) -> list[Path]:
  """Writes PNG plots into `out`: a bar chart per eval metric and learning curves per split.

  Returns:
    The files written.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  files = []
  for exp in dict.fromkeys(r.experiment for r in rows):
    exp_rows = [r for r in rows if r.experiment == exp]
    plotted = (n for n in names if n not in (*EXTRA_KEYS, TRAINABLE))
    for k in (n for n in plotted if n.split("/")[-1] not in COUNT_NAMES):
      rs = [r for r in exp_rows if k in r.stats]
      if not rs:
        continue
      fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rs) + 2), 3.5))
      xs = range(len(rs))
      ax.bar(
        xs, [r.stats[k][0] for r in rs], yerr=[r.stats[k][1] for r in rs], capsize=4, alpha=0.7
      )
      for x, r in zip(xs, rs):
        vals = [m.metrics[k] for m in r.runs if k in m.metrics]
        ax.plot([x] * len(vals), vals, "k.", ms=5)
      # Zoom the y axis onto the data: differences between points are often small.
      lo = min(min(r.stats[k][0] - r.stats[k][1] for r in rs), *_all_values(rs, k))
      hi = max(max(r.stats[k][0] + r.stats[k][1] for r in rs), *_all_values(rs, k))
      pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 1.0
      ax.set_ylim(lo - pad, hi + pad)
      ax.set_xticks(list(xs), [r.point for r in rs], rotation=30, ha="right", fontsize=8)
      ax.set_ylabel(k)
      ax.set_title(f"{exp}: {k} (mean ± std over seeds)", fontsize=9)
      files.append(_save(fig, out / f"{_safe(exp)}__{_safe(k)}.png", plt))
    files += _plot_vs_trainable(exp, exp_rows, names, out, plt)
    files += _plot_curves(exp, exp_rows, out, plt)
  return files


def _plot_vs_trainable(exp: str, rows: Sequence[Row], names: Sequence[str], out: Path, plt):
  """Accuracy / F1 / BLEU against trainable parameters (log scale), one labelled dot a point:
  the picture of a parameter-efficiency ablation."""
  files = []
  rs = [r for r in rows if TRAINABLE in r.stats]
  if len(rs) < 2 or len({r.stats[TRAINABLE][0] for r in rs}) < 2:
    return files
  for k in (n for n in names if n.split("/")[-1] in ("accuracy", "f1", "bleu")):
    pts = [r for r in rs if k in r.stats]
    if len(pts) < 2:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pts:
      x, (y, err) = r.stats[TRAINABLE][0], r.stats[k][:2]
      ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3)
      ax.annotate(r.point, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(k)
    ax.set_title(f"{exp}: {k} vs trainable parameters", fontsize=9)
    files.append(_save(fig, out / f"{_safe(exp)}__{_safe(k)}_vs_trainable.png", plt))
  return files


def _save(fig, path: Path, plt) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _all_values(rows: Sequence[Row], k: str) -> list[float]:
  return [m.metrics[k] for r in rows for m in r.runs if k in m.metrics]


def _plot_curves(exp: str, rows: Sequence[Row], out: Path, plt) -> list[Path]:
  """Learning curves: per split, one subplot per metric, one line per point (seed mean)."""
  # split -> metric -> point -> step -> values over seeds
  curves: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
  for r in rows:
    for run in r.runs:
      for rec in read_metrics(run.workdir):
        split = str(rec.get("split", "train"))
        for k, v in rec.items():
          if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
          curves[split][k][r.point][int(rec["step"])].append(float(v))
  files = []
  for split, metrics in curves.items():
    keys = sorted(metrics)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
      for point, by_step in metrics[k].items():
        steps = sorted(by_step)
        ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker=".", label=point)
      ax.set_title(f"{split}/{k}", fontsize=9)
      ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys) :]:
      ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{exp}: {split} curves (mean over seeds)", fontsize=10)
    files.append(_save(fig, out / f"{_safe(exp)}__curves_{_safe(split)}.png", plt))
  return files


def build(root: str | Path, out: str | Path | None = None, plots: bool = True) -> str:
  """Writes report.md, report.csv and plots for `root`; returns the Markdown.

  Raises:
    FileNotFoundError: if there is no results.json under `root`.
  """
  root = Path(root)
  out = Path(out) if out else root
  runs = find_runs(root)
  if not runs:
    raise FileNotFoundError(f"no {sweep.RESULTS_FILE} under {root}")
  rows, names = aggregate(runs)
  md = f"# Results under {root}\n\n{len(runs)} run(s), {len(rows)} point(s); "
  md += "mean ± std over seeds.\n\n"
  md += markdown(rows, names)
  out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, names, out / "report.csv")
  if plots:
    files = plot(rows, names, out / "plots")
    md += "\n" + "".join(f"![{f.stem}](plots/{f.name})\n" for f in files)
  (out / "report.md").write_text(md)
  return md


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `python -m launch.report ROOT`; returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m launch.report", description=__doc__.split("\n")[0]
  )
  parser.add_argument("root", help="directory searched for results.json")
  parser.add_argument("--out", default=None, help="output directory (default: ROOT)")
  parser.add_argument("--no-plots", dest="plots", action="store_false")
  args = parser.parse_args(argv)
  try:
    md = build(args.root, args.out, args.plots)
  except FileNotFoundError as e:
    print(e, file=sys.stderr)
    return 1
  print(md, end="")
  out = Path(args.out or args.root)
  print(
    f"\nwrote {out / 'report.md'}, {out / 'report.csv'}"
    + (f", {out / 'plots'}/" if args.plots else "")
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

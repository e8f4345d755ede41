"""The results table of a meta-learning sweep: accuracy ± 95% CI per method and shot.

  python -m research.meta.report runs/intent_fewshot_maml [more run dirs ...] [--json=OUT]

Reads every ``results.json`` written by :mod:`research.meta.trainer` under the given folders and
prints a markdown table: one row per algorithm, one column per (data set, N-way K-shot), cells
``accuracy ± ci95`` in percent, with the number of meta-training steps and test episodes.
Cross-data-set runs (``meta.test_data`` another data set) get columns of their own, named
``<meta-train data>→<meta-test data>``, e.g. ``clinc150→banking77 5-way 1-shot``.

Every run of a column is scored on the same meta-test episodes (``meta.test_seed``), so a second
table gives each method's *paired* difference to plain fine-tuning: the mean over episodes of
``acc(method) - acc(finetune)`` ± 1.96 standard errors of those differences (from each run's
``test_episode_accuracy.npy``). ``--json`` writes both as one file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from research.meta.trainer import mean_ci95

ORDER = ("maml", "fomaml", "anil", "reptile", "protonet", "finetune")
BASELINE = "finetune"


def collect(roots: Iterable[str | Path]) -> list[dict]:
  """The meta runs' results.json dicts found under ``roots`` (recursively)."""
  out = []
  for root in roots:
    for path in sorted(Path(root).rglob("results.json")):
      results = json.loads(path.read_text())
      if "meta" in results:
        results["_dir"] = str(path.parent)
        out.append(results)
  return out


def column(run: dict) -> str:
  """``'banking77 5-way 1-shot'``; ``'clinc150→banking77 5-way 1-shot'`` for a run meta-trained
  on CLINC150 and meta-tested on BANKING77 (results.json without ``test_data``: in-domain)."""
  m = run["meta"]
  test_data = m.get("test_data") or m["data"]
  data = m["data"] if test_data == m["data"] else f"{m['data']}→{test_data}"
  return f"{data} {m['n_way']}-way {m['k_shot']}-shot"


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
  """``{column: {algorithm: scores}}``; scores gain ``vs_finetune`` (paired) when possible.

  Several runs in one cell: the last one found wins.
  """
  cells: dict[str, dict[str, dict]] = {}
  episode_accs: dict[tuple[str, str], np.ndarray] = {}
  for r in runs:
    (scores,) = r["eval"].values()
    col, algorithm = column(r), r["meta"]["algorithm"]
    cells.setdefault(col, {})[algorithm] = {
      **scores,
      "steps": r["steps"],
      "wall_s": r.get("wall_s"),
      "test_seed": r["meta"]["test_seed"],
      "dir": r["_dir"],
    }
    npy = Path(r["_dir"]) / "test_episode_accuracy.npy"
    if npy.exists():
      episode_accs[(col, algorithm)] = np.load(npy)
  for col, by_algorithm in cells.items():
    base = episode_accs.get((col, BASELINE))
    if base is None:
      continue
    for algorithm, scores in by_algorithm.items():
      accs = episode_accs.get((col, algorithm))
      same_episodes = (
        accs is not None
        and accs.shape == base.shape
        and scores["test_seed"] == by_algorithm[BASELINE]["test_seed"]
      )
      if algorithm == BASELINE or not same_episodes:
        continue
      diff = mean_ci95(accs - base)
      scores["vs_finetune"] = {"difference": diff["accuracy"], "ci95": diff["ci95"]}
  return cells


def table(runs: list[dict]) -> str:
  """Markdown: accuracy ± CI per method and column, then the paired differences to fine-tuning."""
  cells = summarize(runs)
  columns = list(cells)
  algorithms = [a for a in ORDER if any(a in c for c in cells.values())]
  head = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

  def cell(col: str, a: str) -> str:
    s = cells[col].get(a)
    if s is None:
      return "-"
    return (
      f"{100 * s['accuracy']:.1f} ± {100 * s['ci95']:.1f} ({s['steps']} steps, {s['episodes']} ep.)"
    )

  def paired(col: str, a: str) -> str:
    d = cells[col].get(a, {}).get("vs_finetune")
    return "-" if d is None else f"{100 * d['difference']:+.1f} ± {100 * d['ci95']:.1f}"

  lines = head + [f"| {a} | " + " | ".join(cell(c, a) for c in columns) + " |" for a in algorithms]
  diffs = [a for a in algorithms if any("vs_finetune" in cells[c].get(a, {}) for c in columns)]
  if diffs:
    lines += ["", "Paired difference to fine-tuning on the same episodes (points ± 95% CI):", ""]
    lines += head + [f"| {a} | " + " | ".join(paired(c, a) for c in columns) + " |" for a in diffs]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("roots", nargs="*", default=["runs"])
  p.add_argument("--json", help="also write {column: {method: scores}} here")
  args = p.parse_args(argv)
  runs = collect(args.roots)
  if not runs:
    print(f"no meta-learning results.json under {args.roots}", file=sys.stderr)
    return 1
  print(table(runs))
  if args.json:
    Path(args.json).write_text(json.dumps(summarize(runs), indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

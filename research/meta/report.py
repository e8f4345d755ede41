"""The results table of a meta-learning sweep: accuracy ± 95% CI per method and shot.

  python -m research.meta.report runs/intent_fewshot_maml [more run dirs ...]

Reads every ``results.json`` written by :mod:`research.meta.trainer` under the given folders and
prints a markdown table: one row per algorithm, one column per (data set, N-way K-shot), cells
``accuracy ± ci95`` in percent, with the number of meta-training steps and test episodes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

ORDER = ("maml", "fomaml", "anil", "reptile", "protonet", "finetune")


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


def table(runs: list[dict]) -> str:
  """A markdown table of the runs (several runs in one cell: the last one found wins)."""
  cells: dict[tuple[str, str], str] = {}
  columns: list[str] = []
  for r in runs:
    m = r["meta"]
    col = f"{m['data']} {m['n_way']}-way {m['k_shot']}-shot"
    if col not in columns:
      columns.append(col)
    (scores,) = r["eval"].values()
    cells[(m["algorithm"], col)] = (
      f"{100 * scores['accuracy']:.1f} ± {100 * scores['ci95']:.1f} "
      f"({r['steps']} steps, {scores['episodes']} ep.)"
    )
  algorithms = [a for a in ORDER if any(k[0] == a for k in cells)]
  lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for a in algorithms:
    lines.append(f"| {a} | " + " | ".join(cells.get((a, c), "-") for c in columns) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  roots = (argv if argv is not None else sys.argv[1:]) or ["runs"]
  runs = collect(roots)
  if not runs:
    print(f"no meta-learning results.json under {roots}", file=sys.stderr)
    return 1
  print(table(runs))
  return 0


if __name__ == "__main__":
  sys.exit(main())

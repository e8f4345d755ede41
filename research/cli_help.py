"""The ``--help`` text of ``python -m research.main``: kept apart so the entry point stays thin.

It lists every config under configs/ with its variants, read with ``ast`` (``VARIANTS`` is a
literal tuple), so asking for help imports no config and builds no model.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType

from absl import flags

from research import compile_cache, errors

REPO = Path(__file__).resolve().parents[1]


def config_list() -> list[str]:
  """Two lines per config under configs/: its path and docstring's first line, its variants.

  Read with ``ast`` (``VARIANTS`` is a literal tuple), so ``--help`` imports no config and
  builds no model.
  """
  lines = []
  for path in sorted((REPO / "configs").rglob("*.py")):
    tree = ast.parse(path.read_text())
    variants = next(
      (
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "VARIANTS" for t in node.targets)
      ),
      (),
    )
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    shown = " | ".join(v for v in variants if v) or "-"
    name = path.relative_to(REPO).as_posix()
    lines.append(f"  {name:<38} {doc[0] if doc else ''}")
    lines.append(f"  {'':<38} variants: {shown}")
  return lines


def flag_lines(module: ModuleType) -> list[str]:
  """``module``'s flags as absl describes them, without its header line."""
  lines = flags.FLAGS.module_help(module).strip("\n").splitlines()
  return [line[2:] if line.startswith("  ") else line for line in lines[1:]]


def usage(main: ModuleType) -> str:
  """The ``--help`` text of ``main`` (research.main): synopsis, examples, its flags, configs,
  environment, exit codes."""
  from research.data import locations

  return "\n".join(
    [
      "Train and evaluate an experiment config, or predict with a trained run.",
      "",
      "usage:",
      "  python -m research.main --config=FILE[:variant[,variant...]] --workdir=DIR "
      "[--config.KEY=VALUE ...] [--verbose]",
      "  python -m research.main --mode=predict --workdir=DIR --input=FILE [--output=FILE] "
      "[--task=NAME]",
      "",
      "examples:",
      "  train:   python -m research.main --config=configs/sst2_minilm.py:smoke "
      "--workdir=runs/sst2_smoke",
      "  predict: python -m research.main --mode=predict --workdir=runs/sst2_smoke "
      "--input=reviews.txt",
      "",
      "flags:",
      *flag_lines(main),
      "",
      "configs (variants after ':', comma-separated; 'tiny' runs in seconds on CPU):",
      *config_list(),
      "",
      "environment:",
      f"  {locations.DATA_ENV:<20} raw data sets, one folder each (default: <repo>/data)",
      f"  {locations.TFDS_ENV:<20} prepared tfds data, writable (default: <repo>/.tfds)",
      f"  {errors.VERBOSE_ENV:<20} 1: print the traceback of an error, as --verbose",
      f"  {compile_cache.COMPILE_CACHE_ENV}",
      f"  {'':<20} compiled programs kept on disk: a directory, or 'off' "
      f"(default: ${compile_cache.JAX_DIR_ENV}, else ~/.cache/research/jax)",
      # research.models.common.ATTENTION_ENV (not imported: --help builds no model).
      f"  {'RESEARCH_ATTENTION':<20} attention kernel: auto (cuDNN on a GPU in bf16/fp16, "
      "else XLA), xla or cudnn",
      "  a fresh machine fetches the raw data with: python -m research.data.download sst2 ...",
      "",
      "exit status (an error is one 'error: ...' line on stderr):",
      "  0    done",
      "  1    the run failed: a data file, checkpoint, init source, busy workdir",
      "  2    usage error: a flag, config file, key, variant or value",
      "  143  preempted by SIGTERM: rerun the same command to resume",
    ]
  )

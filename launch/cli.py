"""Command-line pieces shared by the launchers (`launch.local`, `launch.slurm`, `launch.tpu_vm`).

Every launcher takes the trainer's own flags: `--config=configs/x.py[:variant]`,
`--workdir=ROOT` (the sweep root; each point runs in `ROOT/<experiment>/<point>`), `--sweep`,
and any number of `--config.a.b=v` overrides, which are passed to every point unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence

from launch import sweep

DEFAULT_ENTRY = "research.main"


@dataclasses.dataclass
class Plan:
  """What to launch: the config, its points, the root and the pass-through overrides.

  Attributes:
    ref: the parsed `--config`.
    points: the points to run (after `--points` filtering).
    root: the sweep root (`--workdir`).
    extra: `--config.x=v` flags applied to every point.
    entry: the trainer module run with `python -m`.
  """

  ref: sweep.ConfigRef
  points: list[sweep.Point]
  root: str
  extra: list[str]
  entry: str

  def workdir(self, point: sweep.Point) -> str:
    """Returns the point's workdir as a string."""
    return sweep.point_workdir(self.root, self.ref, point)

  def distributed_args(self, mode: str, multi_process: bool) -> list[str]:
    """The override that makes the trainer call `jax.distributed.initialize()`, if wanted.

    Args:
      mode: `on`, `off`, or `auto` (on for multi-process runs when the config has the field).
      multi_process: whether the run has more than one process.
    """
    flag = f"--config.{sweep.DISTRIBUTED_KEY}=true"
    if mode == "on" or (
      mode == "auto" and multi_process and sweep.config_has_key(self.ref, sweep.DISTRIBUTED_KEY)
    ):
      return [] if flag in self.extra else [flag]
    return []

  def args(self, point: sweep.Point) -> list[str]:
    """Returns the trainer arguments for the point."""
    return sweep.trainer_args(self.ref, point, self.workdir(point), self.extra)


def add_common_args(parser: argparse.ArgumentParser) -> None:
  """Adds `--config`, `--workdir`, `--sweep`, `--points`, `--entry`, `--dry-run`."""
  parser.add_argument("--config", required=True, help="configs/<exp>.py[:variant]")
  parser.add_argument(
    "--workdir", required=True, help="sweep root; runs go to ROOT/<experiment>/<point>"
  )
  parser.add_argument("--sweep", action="store_true", help="run every point of get_sweep()")
  parser.add_argument("--points", default=None, help="regex: only points whose name matches")
  parser.add_argument(
    "--entry", default=DEFAULT_ENTRY, help="trainer module run as `python -m ENTRY`"
  )
  parser.add_argument(
    "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print, do not run"
  )
  parser.add_argument(
    "--distributed",
    choices=("auto", "on", "off"),
    default="auto",
    help=f"pass --config.{sweep.DISTRIBUTED_KEY}=true (auto: for multi-process runs, when "
    "the config has that field)",
  )


def parse(
  parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, Plan]:
  """Parses the command line into options and a `Plan`.

  Args:
    parser: a parser that `add_common_args` was applied to (plus launcher options).
    argv: the arguments (without the program name); None reads `sys.argv`.

  Returns:
    The parsed namespace and the plan.
  """
  args, unknown = parser.parse_known_args(argv)
  bad = [a for a in unknown if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  try:
    ref = sweep.ConfigRef.parse(args.config)
    points = sweep.sweep_points(ref, args.sweep)
  except (FileNotFoundError, AttributeError, KeyError, TypeError, ValueError) as e:
    parser.error(str(e))
  if args.points:
    points = [p for p in points if re.search(args.points, p.name)]
    if not points:
      parser.error(f"no sweep point matches --points={args.points!r} (did you pass --sweep?)")
  return args, Plan(ref, points, args.workdir, list(unknown), args.entry)

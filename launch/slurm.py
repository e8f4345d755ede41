"""SLURM launcher: one sbatch script per config, a job array for a sweep.

    python -m launch.slurm --config=configs/sst2_minilm.py --sweep --workdir=runs \
        --nodes=2 --gpus-per-node=8 --time=04:00:00 --partition=gpu --account=myproj --dry-run

Array task `i` runs point `i` of the sweep in `<root>/<experiment>/<point>`; points whose
`results.json` exists are left out of the array (and skipped by the script itself, so a
requeued task does not redo finished work). Inside each task `srun` starts the trainer:
one process per GPU by default (`--ntasks-per-node = --gpus-per-node`), which is what
`jax.distributed.initialize()` auto-detects from SLURM's environment (`SLURM_NTASKS`,
`SLURM_PROCID`, `SLURM_LOCALID` picks the local GPU, the first node of `SLURM_STEP_NODELIST`
is the coordinator); for runs of more than one process the launcher adds
`--config.parallel.distributed=true`, which makes the trainer call it. `--procs=node` starts
one process per node instead; then the trainer must pass all local GPUs to
`jax.distributed.initialize(local_device_ids=...)` itself.
GPUs are not bound per task (no `--gpus-per-task`), since JAX indexes them by local id.

`--dry-run` prints the script; otherwise it is written to
`<root>/<experiment>/slurm/<job-name>.sbatch` and submitted with `sbatch` (`--wait` blocks
until the array finishes, as the tests do).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from launch import cli, sweep


def array_spec(indices: Sequence[int], max_parallel: int | None = None) -> str:
  """Formats array indices compactly: `[0, 1, 2, 5]` -> `0-2,5` (plus `%K` throttle).

  Args:
    indices: sorted, distinct task indices.
    max_parallel: at most this many array tasks at once (`%K`).
  """
  ranges, start, prev = [], None, None
  for i in indices:
    if start is None:
      start = prev = i
    elif i == prev + 1:
      prev = i
    else:
      ranges.append((start, prev))
      start = prev = i
  if start is not None:
    ranges.append((start, prev))
  text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
  return f"{text}%{max_parallel}" if max_parallel else text


def tasks_per_node(procs: str, gpus_per_node: int) -> int:
  """Processes per node: one per GPU (`gpu`), one per node (`node`), or an explicit count."""
  if procs == "gpu":
    return max(1, gpus_per_node)
  if procs == "node":
    return 1
  return int(procs)


def render(
  plan: cli.Plan,
  points: Sequence[sweep.Point],
  *,
  job_name: str,
  nodes: int = 1,
  gpus_per_node: int = 0,
  procs: str = "gpu",
  cpus_per_task: int | None = None,
  mem: str | None = None,
  time: str | None = None,
  partition: str | None = None,
  account: str | None = None,
  array_parallel: int | None = None,
  sbatch_args: Sequence[str] = (),
  setup: Sequence[str] = (),
  python: str = "python",
  chdir: str | None = None,
) -> str:
  """Returns the sbatch script for the given points.

  Args:
    plan: the launch plan (config, root, pass-through overrides, trainer module).
    points: the points to run (a job array when there is more than one point, or when
      they are a subset of the sweep).
    job_name: `--job-name`.
    nodes: nodes per run (`--nodes`).
    gpus_per_node: `--gpus-per-node` (0: none requested).
    procs: `gpu`, `node` or a count: processes per node.
    cpus_per_task: `--cpus-per-task`.
    mem: `--mem` per node.
    time: `--time` limit per run.
    partition: `--partition`.
    account: `--account`.
    array_parallel: throttle, at most this many runs at once.
    sbatch_args: further `#SBATCH` options, verbatim (e.g. `--constraint=a100`).
    setup: shell lines run before the trainer (`module load ...`, `source .venv/...`).
    python: the interpreter on the compute nodes.
    chdir: working directory of the job (default: the current one).

  Returns:
    The script text.
  """
  ntasks = tasks_per_node(procs, gpus_per_node)
  log_dir = Path(plan.root) / plan.ref.experiment / "slurm"
  use_array = len(points) > 1 or (points and len(points) != len(plan.points))
  opts = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={ntasks}"]
  optional = {
    "gpus-per-node": gpus_per_node,
    "cpus-per-task": cpus_per_task,
    "mem": mem,
    "time": time,
    "partition": partition,
    "account": account,
  }
  opts += [f"--{name}={value}" for name, value in optional.items() if value]
  if use_array:
    opts.append(f"--array={array_spec([p.index for p in points], array_parallel)}")
    opts.append(f"--output={log_dir}/%x_%A_%a.out")
  else:
    opts.append(f"--output={log_dir}/%x_%j.out")
  opts.append(f"--chdir={chdir or os.getcwd()}")
  opts += list(sbatch_args)

  lines = [
    "#!/bin/bash",
    f"# {len(points)} run(s) of {plan.ref}, written by launch.slurm.",
    *(f"#SBATCH {o}" for o in opts),
    "set -eo pipefail",
    *setup,
    "export PYTHONUNBUFFERED=1",
    "",
    f'case "${{SLURM_ARRAY_TASK_ID:-{points[0].index}}}" in',
  ]
  for p in points:
    overrides = [f"--config.{k}={sweep.format_value(v)}" for k, v in p.overrides.items()]
    lines.append(f"  {p.index}) WORKDIR={shlex.quote(plan.workdir(p))}")
    lines.append(f"     POINT_ARGS=({shlex.join(overrides)}) ;;")
  lines += [
    '  *) echo "no sweep point for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
    "esac",
    'if [ -f "$WORKDIR/results.json" ]; then echo "already done: $WORKDIR"; exit 0; fi',
    'mkdir -p "$WORKDIR"',
    'echo "run $WORKDIR on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST"',
  ]
  # One process per node or per GPU; the trainer's jax.distributed.initialize() reads
  # SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NODELIST set by srun.
  srun = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={ntasks}", "--kill-on-bad-exit=1"]
  common = [f"--config={plan.ref}", *plan.extra]
  cmd = shlex.join([*srun, python, "-m", plan.entry, *common])
  lines.append(f'{cmd} --workdir="$WORKDIR" "${{POINT_ARGS[@]}}"')
  return "\n".join(lines) + "\n"


def submit(script: Path, wait: bool = False, sbatch: str = "sbatch") -> str:
  """Submits the script with sbatch and returns the job id.

  Args:
    script: the sbatch file.
    wait: pass `--wait` (block until the job ends; its exit code is checked).
    sbatch: the sbatch executable.

  Raises:
    RuntimeError: if sbatch fails or prints no job id.
  """
  cmd = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script)]
  res = subprocess.run(cmd, capture_output=True, text=True)
  m = re.match(r"(\d+)", res.stdout.strip())
  if res.returncode != 0 or not m:
    raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
  return m.group(1)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `python -m launch.slurm`; returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m launch.slurm", description=__doc__.split("\n")[0], allow_abbrev=False
  )
  cli.add_common_args(parser)
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus-per-node", "--gpus_per_node", type=int, default=0)
  parser.add_argument(
    "--procs", default="gpu", help="processes per node: gpu (one per GPU), node, or a count"
  )
  parser.add_argument("--cpus-per-task", "--cpus_per_task", type=int, default=None)
  parser.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
  parser.add_argument("--time", default=None, help="time limit per run, e.g. 04:00:00")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--job-name", "--job_name", default=None)
  parser.add_argument("--array-parallel", "--array_parallel", type=int, default=None)
  parser.add_argument(
    "--sbatch", action="append", default=[], help="extra #SBATCH option, e.g. --sbatch=--qos=high"
  )
  parser.add_argument(
    "--setup", action="append", default=[], help="shell line before the run (repeatable)"
  )
  parser.add_argument("--python", default=sys.executable, help="interpreter on the nodes")
  parser.add_argument("--chdir", default=None, help="job working directory (default: cwd)")
  parser.add_argument("--wait", action="store_true", help="sbatch --wait: block until done")
  args, plan = cli.parse(parser, argv)
  nprocs = args.nodes * tasks_per_node(args.procs, args.gpus_per_node)
  plan.extra += plan.distributed_args(args.distributed, nprocs > 1)

  todo = (
    plan.points
    if args.dry_run
    else [p for p in plan.points if not sweep.is_done(Path(plan.workdir(p)))]
  )
  if not todo:
    print(f"all {len(plan.points)} point(s) already have results.json; nothing to submit")
    return 0
  script = render(
    plan,
    todo,
    job_name=args.job_name or plan.ref.experiment,
    nodes=args.nodes,
    gpus_per_node=args.gpus_per_node,
    procs=args.procs,
    cpus_per_task=args.cpus_per_task,
    mem=args.mem,
    time=args.time,
    partition=args.partition,
    account=args.account,
    array_parallel=args.array_parallel,
    sbatch_args=args.sbatch,
    setup=args.setup,
    python=args.python,
    chdir=args.chdir,
  )
  if args.dry_run:
    print(script, end="")
    return 0
  # Relative paths in the script are relative to the job's --chdir, so create them there.
  exp_dir = Path(args.chdir or os.getcwd()) / plan.root / plan.ref.experiment
  (exp_dir / "slurm").mkdir(parents=True, exist_ok=True)
  for p in todo:
    sweep.write_point_file(exp_dir / p.name, plan.ref, p)
  path = exp_dir / "slurm" / f"{args.job_name or plan.ref.experiment}.sbatch"
  path.write_text(script)
  try:
    job = submit(path, wait=args.wait)
  except (RuntimeError, OSError) as e:
    print(f"sbatch failed: {e}", file=sys.stderr)
    return 1
  print(f"submitted job {job}: {len(todo)} run(s), script {path}, logs {exp_dir / 'slurm'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

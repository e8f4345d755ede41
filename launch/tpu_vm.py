"""TPU VM launcher: `gcloud compute tpus tpu-vm` commands for a TPU VM or a pod slice.

    python -m launch.tpu_vm --config=configs/sst2_minilm.py --workdir=gs://bucket/runs \
        --tpu=my-v4-32 --zone=us-central2-b --create --accelerator-type=v4-32 --dry-run

The commands, in order:
1. (`--create`) `gcloud compute tpus tpu-vm create` the TPU VM;
2. `ssh --worker=all` to make the code directory, `scp --worker=all --recurse` the code
   (the package, launchers, configs and pyproject, plus any `--code` paths such as a local
   `data` directory) to every host;
3. `ssh --worker=all` to install it (`--setup`, default installs `jax[tpu]` and the package);
4. per sweep point, `ssh --worker=all --command=...` running the trainer on every host at
   once, as a pod slice needs (with `--config.parallel.distributed=true`, the trainer's
   `jax.distributed.initialize()` auto-detects the pod). Points run one after another on
   the whole slice.

On a pod slice every host writes nothing but process 0's outputs, so the workdir should be
a bucket (`gs://...`) or a path you copy back from worker 0. For local workdirs, a point
whose `results.json` exists on the workers is skipped remotely. `--dry-run` prints the
commands; without it they run here one by one (stopping at the first failing setup step;
failing points are reported and the rest go on).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

from launch import cli

DEFAULT_CODE = ("pyproject.toml", "README.md", "research", "launch", "configs")
DEFAULT_SETUP = 'pip install -q -U "jax[tpu]" && pip install -q -e .'


def _gcloud(sub: str, tpu: str, zone: str, project: str | None) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", sub, tpu, f"--zone={zone}"]
  return cmd + ([f"--project={project}"] if project else [])


def shell_join(cmd: Sequence[str]) -> str:
  """Like `shlex.join`, but quotes only the value of `--flag=value` (`--command='a b'`)."""
  out = []
  for a in cmd:
    flag, eq, value = a.partition("=")
    if eq and flag.startswith("--") and shlex.quote(a) != a:
      out.append(f"{flag}={shlex.quote(value)}")
    else:
      out.append(shlex.quote(a))
  return " ".join(out)


def commands(
  plan: cli.Plan,
  *,
  tpu: str,
  zone: str,
  project: str | None = None,
  create: bool = False,
  accelerator_type: str | None = None,
  version: str = "tpu-ubuntu2204-base",
  spot: bool = False,
  remote_dir: str = "~/research",
  code: Sequence[str] = DEFAULT_CODE,
  setup: str | None = DEFAULT_SETUP,
  python: str = "python3",
) -> list[list[str]]:
  """Returns the gcloud commands (argv lists) that create, copy, set up and run.

  Args:
    plan: the launch plan.
    tpu: TPU VM name.
    zone: its zone.
    project: GCP project (default: gcloud's configured one).
    create: include the `create` command.
    accelerator_type: e.g. `v4-32`; required with `create`.
    version: TPU software version for `create`.
    spot: create a Spot TPU.
    remote_dir: where the code goes on each host.
    code: local paths copied there.
    setup: shell command run in `remote_dir` on every host after the copy (None: skip).
    python: the interpreter on the hosts.

  Returns:
    The commands in order; the last `len(plan.points)` are the runs.

  Raises:
    ValueError: if `create` is set without `accelerator_type`.
  """
  cmds = []
  if create:
    if not accelerator_type:
      raise ValueError("--create needs --accelerator-type (e.g. v4-32)")
    cmds.append(
      _gcloud("create", tpu, zone, project)
      + [f"--accelerator-type={accelerator_type}", f"--version={version}"]
      + (["--spot"] if spot else [])
    )
  ssh = [*_gcloud("ssh", tpu, zone, project), "--worker=all"]
  cmds.append([*ssh, f"--command=mkdir -p {remote_dir}"])
  scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", *code, f"{tpu}:{remote_dir}"]
  scp += [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  cmds.append([*scp, "--worker=all", "--recurse"])
  if setup:
    cmds.append([*ssh, f"--command=cd {remote_dir} && {setup}"])
  for p in plan.points:
    workdir = plan.workdir(p)
    run = shlex.join([python, "-m", plan.entry, *plan.args(p)])
    if not workdir.startswith("gs://"):
      run = f"test -f {shlex.quote(workdir + '/results.json')} || {run}"
    cmds.append([*ssh, f"--command=cd {remote_dir} && {run}"])
  return cmds


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `python -m launch.tpu_vm`; returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m launch.tpu_vm", description=__doc__.split("\n")[0], allow_abbrev=False
  )
  cli.add_common_args(parser)
  parser.add_argument("--tpu", default="research-tpu", help="TPU VM name")
  parser.add_argument("--zone", default="us-central2-b")
  parser.add_argument("--project", default=None)
  parser.add_argument("--create", action="store_true", help="create the TPU VM first")
  parser.add_argument("--accelerator-type", "--accelerator_type", default="v4-8")
  parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version")
  parser.add_argument("--spot", action="store_true")
  parser.add_argument("--remote-dir", "--remote_dir", default="~/research")
  parser.add_argument(
    "--code",
    action="append",
    default=[],
    help=f"another local path to copy (repeatable), besides {' '.join(DEFAULT_CODE)}",
  )
  parser.add_argument("--setup", default=DEFAULT_SETUP, help="install command ('' to skip)")
  parser.add_argument("--python", default="python3", help="interpreter on the TPU hosts")
  args, plan = cli.parse(parser, argv)
  # Every host of a pod slice runs the trainer; on one host initialize() is harmless.
  plan.extra += plan.distributed_args(args.distributed, multi_process=True)
  cmds = commands(
    plan,
    tpu=args.tpu,
    zone=args.zone,
    project=args.project,
    create=args.create,
    accelerator_type=args.accelerator_type,
    version=args.version,
    spot=args.spot,
    remote_dir=args.remote_dir,
    code=list(dict.fromkeys([*DEFAULT_CODE, *args.code])),
    setup=args.setup or None,
    python=args.python,
  )
  if args.dry_run:
    for c in cmds:
      print(shell_join(c))
    return 0
  n_runs = len(plan.points)
  failed = []
  for k, c in enumerate(cmds):
    print(f"$ {shell_join(c)}", flush=True)
    try:
      rc = subprocess.run(c).returncode
    except FileNotFoundError:
      print("gcloud not found: install the Google Cloud CLI or use --dry-run", file=sys.stderr)
      return 2
    if rc == 0:
      continue
    if k < len(cmds) - n_runs:
      print(f"setup step failed ({rc}); stopping", file=sys.stderr)
      return 1
    failed.append(plan.points[k - (len(cmds) - n_runs)].name)
  if failed:
    print(f"failed points: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

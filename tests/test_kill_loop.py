"""SIGKILL at random moments, some inside checkpoint writes, then rerun until the run finishes.

What a user relies on when a job is killed without warning (OOM killer, a node lost, ``kill
-9``): rerunning the same command resumes, and the run ends bitwise where an uninterrupted one
ends, with one record per logged step in metrics.jsonl. The test runs the CLI on the ``tiny``
SST-2 config with a checkpoint every 2 steps, so writes are frequent. Kills alternate between
two kinds, their delays drawn from a seeded RNG: *in a write* (as soon as the 2nd or 3rd
checkpoint directory of the launch appears in its temporary form, plus 0-20 ms) and *anywhere*
(0-0.6 s after the launch's first new checkpoint). A kill counts as inside a write when the
killed process leaves a ``*.orbax-checkpoint-tmp*`` directory behind. ``-m slow`` runs 12 kills;
the fast suite 3.

And a full disk: a checkpoint write that fails stops the run with one line, the checkpoints
committed before it stay byte for byte, and a rerun with space resumes from the newest. The
disk is a real size-limited filesystem, a tmpfs mounted in a private mount namespace
(``unshare``: a user namespace needs no root); where none can be mounted the test is skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_util import REPO, max_abs_diff

from research.subprocess_env import child_env
from research.train import checkpoints as ckpt_lib
from research.train import segments as segments_lib

SEED = 26
POLL_S = 0.005


# The tiny SST-2 run, a checkpoint every 2 steps (dropout on: the RNG must resume too).
TRAIN = [
  sys.executable,
  "-m",
  "research.main",
  "--config=configs/sst2_minilm.py:tiny",
  "--config.train.log_every=2",
  "--config.train.checkpoint_every=2",
  "--config.train.eval_every=0",
]


def command(workdir: Path, steps: int) -> list[str]:
  return [*TRAIN, f"--workdir={workdir}", f"--config.train.steps={steps}"]


def launch(workdir: Path, steps: int, log: Path) -> subprocess.Popen:
  with open(log, "ab") as f:
    return subprocess.Popen(
      command(workdir, steps), cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT
    )


def checkpoint_dirs(workdir: Path) -> tuple[set[str], set[str]]:
  """``(committed step directories, temporary ones being written)`` under checkpoints/."""
  try:
    names = {p.name for p in (workdir / "checkpoints").iterdir()}
  except FileNotFoundError:
    return set(), set()
  return {n for n in names if n.isdigit()}, {n for n in names if "tmp" in n}


def kill_when(proc: subprocess.Popen, workdir: Path, ready, delay: float) -> bool:
  """SIGKILLs ``proc`` ``delay`` s after ``ready(committed, writing)`` first holds; False when
  the process ended first."""
  while not ready(*checkpoint_dirs(workdir)):
    if proc.poll() is not None:
      return False
    time.sleep(POLL_S)
  time.sleep(delay)
  if proc.poll() is not None:
    return False
  proc.kill()
  proc.wait()  # Reaped: the pid in the workdir's lock file is gone, as after a real kill.
  return True


def kill_loop(workdir: Path, steps: int, kills: int, logs: Path) -> dict:
  """Launches the run ``kills`` times, killing each, then lets it finish.

  Returns:
    ``{'kills', 'in_write', 'launches'}``.
  """
  rng = random.Random(SEED)
  done = {"kills": 0, "in_write": 0, "launches": 0}
  while True:
    done["launches"] += 1
    proc = launch(workdir, steps, logs / f"launch{done['launches']}.log")
    if done["kills"] == kills:
      assert proc.wait(timeout=600) == 0, (logs / f"launch{done['launches']}.log").read_text()
      return done
    before, _ = checkpoint_dirs(workdir)
    if done["kills"] % 2 == 0:  # In a write: the k-th temporary directory of this launch.
      k, seen = rng.randint(2, 3), set()

      def ready(committed, writing, k=k, seen=seen):
        seen.update(writing)
        return len(seen) >= k

      delay = rng.uniform(0.0, 0.02)
    else:  # Anywhere, once this launch has committed a checkpoint.

      def ready(committed, writing, before=before):
        return bool(committed - before)

      delay = rng.uniform(0.0, 0.6)
    if not kill_when(proc, workdir, ready, delay):
      raise AssertionError(f"the run finished after {done['kills']} kills; give it more steps")
    done["kills"] += 1
    done["in_write"] += bool(checkpoint_dirs(workdir)[1])


def train_records(workdir: Path) -> list[dict]:
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The uninterrupted run of each length, launched the same way."""
  runs = {}

  def get(steps: int) -> Path:
    if steps not in runs:
      workdir = tmp_path_factory.mktemp(f"uninterrupted{steps}")
      proc = launch(workdir, steps, workdir.parent / f"{workdir.name}.log")
      assert proc.wait(timeout=600) == 0, (workdir.parent / f"{workdir.name}.log").read_text()
      runs[steps] = workdir
    return runs[steps]

  return get


@pytest.mark.parametrize(
  "kills", [3, pytest.param(12, marks=pytest.mark.slow)], ids=lambda k: f"{k}kills"
)
def test_kill_loop_resumes_bitwise_to_the_uninterrupted_run(kills, uninterrupted, tmp_path):
  steps = 8 * kills + 8  # Room for every kill: a launch commits at most a few checkpoints.
  full = uninterrupted(steps)
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  logs.mkdir()
  done = kill_loop(workdir, steps, kills, logs)
  print(f"kill loop: {done}")
  assert done["kills"] == kills
  assert done["in_write"] >= 1, done  # At least one kill left a checkpoint half-written.
  final, where = ckpt_lib.load_params(workdir, prefer="latest")
  assert where.endswith(f"checkpoints/{steps}")
  assert max_abs_diff(ckpt_lib.load_params(full, prefer="latest")[0], final) == 0.0
  # One record per logged step, equal to the uninterrupted run's (losses bitwise too).
  records = train_records(workdir)
  assert [r["step"] for r in records] == list(range(2, steps + 1, 2))
  assert records == train_records(full)
  checkpoints = (workdir / "checkpoints").iterdir()
  assert not [p.name for p in checkpoints if "tmp" in p.name]  # Cleaned at each start.
  assert not (workdir / ".lock").exists()
  # results.json totals every segment that logged a window (a kill before it leaves none).
  results = json.loads((workdir / "results.json").read_text())
  segs = json.loads((workdir / segments_lib.SEGMENTS_NAME).read_text())
  assert results["segments"] == segs and 2 <= len(segs) <= done["launches"]
  assert results["trained_steps"] == sum(s["steps"] for s in segs) >= steps
  assert results["wall_s"] == pytest.approx(sum(s["wall_s"] for s in segs), rel=1e-12)
  assert isinstance(results["step_time_s"], float)


# Runs inside the private mount namespace: the tmpfs (and the run on it) is gone when it ends,
# so everything the test checks is written to OUT.
DISK_FULL_DRIVER = r"""
set -u
MNT=$1; OUT=$2; LEAVE=$3; shift 3
mount -t tmpfs -o size=64m tmpfs "$MNT" || exit 77
run() { "$@" --workdir="$MNT/run" --config.train.steps=$STEPS; }
manifest() { (cd "$MNT/run" && find checkpoints -type f | LC_ALL=C sort | xargs sha256sum); }
STEPS=4 run "$@" > "$OUT/1.log" 2>&1; echo $? > "$OUT/1.rc"
manifest > "$OUT/before.sha"
FILL=$(($(df --output=avail -B1 "$MNT" | tail -1) - LEAVE))
fallocate -l $FILL "$MNT/filler" || head -c $FILL /dev/zero > "$MNT/filler"
STEPS=8 run "$@" > "$OUT/2.log" 2>&1; echo $? > "$OUT/2.rc"
manifest > "$OUT/after.sha"
rm "$MNT/filler"
STEPS=8 run "$@" > "$OUT/3.log" 2>&1; echo $? > "$OUT/3.rc"
ls "$MNT/run/checkpoints" > "$OUT/checkpoints.ls"
cp "$MNT/run/results.json" "$OUT/"
"""


def private_mount_namespace(where: Path) -> tuple[list[str] | None, str]:
  """An ``unshare`` prefix under which a tmpfs can be mounted, or None and why not."""
  unshare = shutil.which("unshare")
  if unshare is None:
    return None, "no unshare command"
  prefixes = [[unshare, "--user", "--map-root-user", "--mount"]]
  if os.geteuid() == 0:
    prefixes.append([unshare, "--mount"])
  where.mkdir()
  why = ""
  for prefix in prefixes:
    probe = [*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"]
    out = subprocess.run(probe, capture_output=True, text=True)
    if out.returncode == 0:
      return prefix, ""
    why = f"{' '.join(probe[:-3])}: {out.stderr.strip() or out.returncode}"
  return None, why


def test_disk_full_keeps_committed_checkpoints_and_a_rerun_resumes(tmp_path):
  prefix, why = private_mount_namespace(tmp_path / "probe")
  if prefix is None:
    pytest.skip(f"cannot mount a size-limited tmpfs ({why})")
  (tmp_path / "mnt").mkdir()
  out = tmp_path / "out"
  out.mkdir()
  (tmp_path / "driver.sh").write_text(DISK_FULL_DRIVER)
  # 1 MiB left: a step's checkpoint (about 4 MiB) cannot be written; logs still can.
  driver = ["bash", str(tmp_path / "driver.sh"), str(tmp_path / "mnt"), str(out), str(2**20)]
  subprocess.run([*prefix, *driver, *TRAIN], cwd=REPO, env=child_env(), check=True, timeout=900)
  rc = {phase: int((out / f"{phase}.rc").read_text()) for phase in (1, 2, 3)}
  assert rc[1] == 0, (out / "1.log").read_text()[-3000:]
  # The full disk: one error line, last, naming the checkpoint, the cause and the way on.
  log = (out / "2.log").read_text()
  assert rc[2] == 1 and "Traceback" not in log, log[-3000:]
  errors = [x for x in log.splitlines() if x.startswith("error:")]
  assert errors == [log.strip().splitlines()[-1]]
  assert errors[0].startswith("error: could not write checkpoint 6 in ")
  assert "No space left on device (errno 28)" in errors[0]
  assert errors[0].endswith(
    "[2, 4] are untouched: free space and rerun the same command to resume from step 4"
  )
  # Checkpoints 2 and 4, byte for byte; the failed write is only a temporary directory.
  before = (out / "before.sha").read_text().splitlines()
  after = (out / "after.sha").read_text().splitlines()
  assert before and [x for x in after if "orbax-checkpoint-tmp" not in x] == before
  # With space again, the same command resumes from 4 and finishes.
  assert rc[3] == 0, (out / "3.log").read_text()[-3000:]
  assert "init: resumed from" in (out / "3.log").read_text()
  assert json.loads((out / "results.json").read_text())["init"].endswith("checkpoints/4")
  assert (out / "checkpoints.ls").read_text().split() == ["6", "8"]


def test_second_run_on_a_busy_workdir_stops_at_once_and_the_first_is_untouched(tmp_path):
  """Two real runs on one workdir: the second exits 1 naming the first's pid before writing
  anything, and the first finishes as it would have alone (one metrics trajectory, its params).

  The first run is paused (SIGSTOP) while it holds the lock, so the second always meets it
  mid-run however slowly either starts."""
  workdir, alone = tmp_path / "run", tmp_path / "alone"
  first = launch(workdir, 12, tmp_path / "first.log")
  while not (workdir / ".lock").exists():
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(POLL_S)
  os.kill(first.pid, signal.SIGSTOP)
  try:
    before = sorted(p.name for p in workdir.rglob("*"))
    second = subprocess.run(
      command(workdir, 30), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert sorted(p.name for p in workdir.rglob("*")) == before  # The second wrote nothing.
  finally:
    os.kill(first.pid, signal.SIGCONT)
  assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
  assert second.returncode == 1, second.stderr[-3000:]
  last = second.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and f"in use by another run (pid {first.pid} " in last, last
  assert json.loads((workdir / "results.json").read_text())["steps"] == 12
  assert train_records(workdir) == train_records(run_alone(alone))
  ours = ckpt_lib.load_params(workdir, prefer="latest")[0]
  assert max_abs_diff(ckpt_lib.load_params(alone, prefer="latest")[0], ours) == 0.0


def run_alone(workdir: Path) -> Path:
  subprocess.run(
    command(workdir, 12), cwd=REPO, env=child_env(), capture_output=True, check=True, timeout=600
  )
  return workdir

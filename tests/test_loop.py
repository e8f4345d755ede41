"""The one training loop, checked against every training program (``pytest -k loop``).

Each test runs the real program through :func:`research.train.loop.run` on its ``tiny`` config:
``supervised`` (SST-2 fixture, dropout on, so the RNG must resume too), ``multitask`` (SST-2 +
CoNLL fixtures, the task switching on either side of the checkpoint) and ``maml`` (second-order
MAML on 3-way 1-shot BANKING77 fixture episodes). What a user relies on: a run interrupted and
rerun ends bitwise where the uninterrupted run ends, having seen the very same batches; SIGTERM
stops after a step with a checkpoint of that step; a non-finite step is skipped and counted, and
a streak of them stops the run naming the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from train_util import REPO, batch_digest, load_config_module, max_abs_diff, tiny_config

from research import paths
from research.meta import trainer as meta_trainer  # noqa: F401 (registers the meta program)
from research.subprocess_env import child_env
from research.train import checkpoints as ckpt_lib
from research.train import loop
from research.train import workdir as workdir_lib


class Interrupted(Exception):
  """Stands in for a crash in the middle of a run."""


def supervised():
  config = tiny_config(steps=8, log_every=2, checkpoint_every=4, eval_every=0)
  config.model.dropout = 0.1  # Dropout on: the RNG must resume too.
  config.tasks.sst2.head.dropout = 0.1
  return config


def multitask():
  config = load_config_module("multitask_sst2_conll").get_config("tiny")
  config.train.update(steps=8, log_every=2, checkpoint_every=4, eval_every=0)
  config.multitask.block = 4  # Both tasks on either side of the checkpoint.
  return config


def maml():
  config = load_config_module("intent_fewshot_maml").get_config("tiny")
  config.meta.algorithm = "maml"
  config.train.update(steps=8, log_every=2, checkpoint_every=4, eval_every=0)
  return config


PROGRAMS = {"supervised": supervised, "multitask": multitask, "maml": maml}


def run(config, workdir, hook=None):
  return loop.train_and_evaluate(config, str(workdir), batch_hook=hook)


def recorder(seen: dict, action=None):
  """A batch hook recording each step's batch digest; ``action(step)`` runs first."""

  def hook(step, batch):
    if action is not None:
      action(step)
    seen[step] = batch_digest(batch)
    return batch

  return hook


def final_params(workdir):
  return ckpt_lib.load_params(workdir, prefer="latest")[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Each program's uninterrupted 8-step run: its workdir, results and batch digests."""
  out = {}

  def get(name):
    if name not in out:
      workdir, seen = tmp_path_factory.mktemp(f"full_{name}"), {}
      out[name] = (workdir, run(PROGRAMS[name](), workdir, recorder(seen)), seen)
    return out[name]

  return get


def wait_for(path, seconds=60):
  deadline = time.time() + seconds  # Checkpoints are written asynchronously.
  while not path.is_dir():
    assert time.time() < deadline, f"no {path}"
    time.sleep(0.2)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_loop_resume_after_crash_equals_uninterrupted_run(name, uninterrupted, tmp_path):
  full_dir, full, seen_full = uninterrupted(name)

  def crash(step):
    if step == 7:  # Read ahead after step 6 was logged; checkpoint 4 is the last one.
      raise Interrupted

  seen_crashed, seen_resumed = {}, {}
  with pytest.raises(Interrupted):
    run(PROGRAMS[name](), tmp_path, recorder(seen_crashed, crash))
  wait_for(tmp_path / "checkpoints" / "4")
  time.sleep(1.0)
  resumed = run(PROGRAMS[name](), tmp_path, recorder(seen_resumed))
  assert resumed["init"].startswith("resumed from") and resumed["init"].endswith("/4")
  assert seen_crashed == {s: seen_full[s] for s in range(7)}
  assert seen_resumed == {s: seen_full[s] for s in range(4, 8)}  # The very same batches.
  # metrics.jsonl holds one trajectory: the crashed run's record of step 6 was replaced.
  assert [r["step"] for r in train_records(tmp_path)] == [2, 4, 6, 8]
  assert max_abs_diff(final_params(full_dir), final_params(tmp_path)) == 0.0
  assert resumed["eval"] == full["eval"]


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_loop_sigterm_checkpoints_and_resumes_exactly(name, uninterrupted, tmp_path):
  full_dir, full, seen_full = uninterrupted(name)
  sent = []

  def terminate(step):
    if step == 3 and not sent:  # Read ahead while step 1 or 2 trains.
      sent.append(step)
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.Preempted) as stopped:
    run(PROGRAMS[name](), tmp_path, recorder({}, terminate))
  step = stopped.value.step
  assert 1 <= step <= 3 and (tmp_path / "checkpoints" / str(step)).is_dir()
  assert f"checkpoint saved in {tmp_path}/checkpoints/{step}" in str(stopped.value)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is the loop's only.
  assert not (tmp_path / "results.json").exists()
  seen_resumed = {}
  resumed = run(PROGRAMS[name](), tmp_path, recorder(seen_resumed))
  assert resumed["init"].endswith(f"/{step}")
  assert seen_resumed == {s: seen_full[s] for s in range(step, 8)}
  assert max_abs_diff(final_params(full_dir), final_params(tmp_path)) == 0.0
  assert resumed["eval"] == full["eval"]


def poison(batch):
  """Token ids out of the vocabulary: the embedding lookup gives NaN, so the step's loss."""
  return {k: np.full_like(v, 2**30) if k.endswith("input_ids") else v for k, v in batch.items()}


def train_records(workdir):
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in records if r["split"] == "train"]


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_loop_nonfinite_step_is_skipped_and_counted(name, uninterrupted, tmp_path):
  config = PROGRAMS[name]()
  config.train.checkpoint_every = 8
  results = run(config, tmp_path, lambda step, b: poison(b) if step == 2 else b)
  assert [r["nonfinite_total"] for r in train_records(tmp_path)] == [0, 1, 1, 1]
  assert all(np.isfinite(r["loss"]) for r in train_records(tmp_path))
  assert results["steps"] == 8
  params = paths.flatten(final_params(tmp_path))
  assert all(np.isfinite(v).all() for v in params.values())
  # Step 3 was skipped, not applied: finite params, yet not the uninterrupted run's.
  assert max_abs_diff(final_params(uninterrupted(name)[0]), final_params(tmp_path)) > 0.0


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_loop_nonfinite_streak_stops_naming_last_good_checkpoint(name, tmp_path):
  config = PROGRAMS[name]()
  config.train.update(log_every=1, checkpoint_every=2, nonfinite_patience=3)
  with pytest.raises(
    loop.NonFiniteError, match=r"stopping at step 5: 3 non-finite steps in a row.*checkpoint is 4 "
  ):
    run(config, tmp_path, lambda step, b: poison(b) if step >= 2 else b)
  final, where = ckpt_lib.load_params(tmp_path, prefer="latest")
  assert where.endswith("checkpoints/4")  # Steps 3 and 4 were skipped: step 2's params.
  assert all(np.isfinite(x).all() for x in paths.flatten(final).values())
  assert not (tmp_path / "results.json").exists()


def test_loop_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  (tmp_path / ".lock").write_text(json.dumps(holder))
  with pytest.raises(
    workdir_lib.WorkdirBusyError, match=rf"in use by another run \(pid {os.getpid()} "
  ):
    run(supervised(), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # Nothing else written.


def test_loop_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = {"host": socket.gethostname(), "pid": dead.pid, "started": 0.0}
  (tmp_path / ".lock").write_text(json.dumps(stale))
  config = supervised()
  config.train.steps = 2
  assert run(config, tmp_path)["steps"] == 2
  assert not (tmp_path / ".lock").exists()  # Released at the end.


def test_lock_is_never_seen_empty_and_its_claim_file_is_removed(tmp_path):
  with workdir_lib.locked(tmp_path):
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
  assert list(tmp_path.iterdir()) == []


def test_metrics_record_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
  from research.train.metrics import MetricWriter

  whole = [{"step": 1, "split": "train", "loss": 0.5}, {"step": 2, "split": "train", "loss": 0.4}]
  text = "".join(json.dumps(r) + "\n" for r in whole) + '{"step": 3, "split": "tr'
  (tmp_path / "metrics.jsonl").write_text(text)
  writer = MetricWriter(tmp_path, total_steps=4, initial_step=2, progress=False)
  writer.drop_after(2)
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x) for x in lines] == whole


def test_loop_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, capfd):
  config = supervised()
  run(config, tmp_path)  # Checkpoints 4 and 8.
  for f in (tmp_path / "checkpoints" / "8").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")  # A save cut short by a full disk or a kill.
  config = supervised()
  config.train.steps = 12
  resumed = run(config, tmp_path)
  assert resumed["init"].endswith("checkpoints/4") and resumed["steps"] == 12
  assert f"checkpoint {tmp_path}/checkpoints/8 is unreadable" in capfd.readouterr().err
  assert (tmp_path / "checkpoints_damaged" / "8").is_dir()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
    8,
    12,
  ]


def test_loop_redirected_run_prints_progress_lines_with_eta(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "research.main",
      "--config=configs/sst2_minilm.py:tiny",
      f"--workdir={tmp_path}",
      "--config.train.steps=6",
      "--config.train.log_every=2",
      "--config.train.progress=True",
      "--config.train.progress_every_s=0",
    ],
    cwd=REPO,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [x for x in out.stderr.splitlines() if x.startswith("step ") and "ETA" in x]
  # The first window (compilation) sets the rate; then one line per logged window.
  assert [x.split(" ")[1] for x in lines] == ["4/6", "6/6"], out.stderr[-2000:]
  assert re.search(r"examples/s, ETA \d+m\d\ds, loss \d", lines[0])


def test_loop_profile_steps_writes_a_trace_of_those_steps(tmp_path, capfd):
  """``train.profile_steps=(2, 4)``: a jax.profiler trace (Perfetto and TensorBoard files) of
  steps 2-3 in <workdir>/profile, announced on the console; the run itself is unchanged."""
  config = supervised()
  config.train.profile_steps = (2, 4)
  results = run(config, tmp_path)
  assert results["steps"] == 8
  traces = list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert "profile of steps 2-3" in capfd.readouterr().err  # The console (stderr).
  config.train.profile_steps = (4,)
  with pytest.raises(Exception, match=r"train.profile_steps=\(4,\): must be \(first, stop\)"):
    run(config, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()  # Refused before anything is written.


def test_checkpoint_of_a_replicated_state_on_8_devices_compiles_nothing(tmp_path):
  """A checkpoint of replicated arrays is written from one device on CPU: orbax's
  replica-parallel saving compiled a slice per device and array shape (72 compilations for
  MiniLM's first save on the 8 simulated devices). The files restore to the same values."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  replicated = NamedSharding(jax.make_mesh((8,), ("data",)), P())
  rng = np.random.default_rng(0)
  params = {
    name: jax.device_put(rng.standard_normal(shape).astype(np.float32), replicated)
    for name, shape in (("bias", (24,)), ("kernel", (40, 24)))
  }
  compiles = []

  def listener(event: str, duration: float, **kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kw.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ckpts = ckpt_lib.Checkpoints(tmp_path, best_metric="score")
    ckpts.save_best(1, params, {"score": 1.0})
    ckpts.wait()
    ckpts.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  restored, where = ckpt_lib.load_params(tmp_path)
  assert where.endswith("best/1")
  for name, value in params.items():
    np.testing.assert_array_equal(restored[name], np.asarray(value))

"""Sweep expansion and the local launcher, on the fake trainer in tests/fixtures/launch.

Selected by `pytest -k sweep`. The real-trainer acceptance runs live in
test_launch_acceptance.py.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import cli, local, sweep
from research import config_lib
from research.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "launch"
FAKE_CONFIG = FIXTURES / "fake_exp.py"


def fake_env() -> dict:
  """Environment for subprocesses: the fake trainer importable, no fake-device XLA flags."""
  return child_env(FIXTURES, REPO)


def fake_plan(root: Path, points=None, arg: str = "quick", extra=()) -> cli.Plan:
  ref = sweep.ConfigRef.parse(f"{FAKE_CONFIG}:{arg}")
  points = sweep.sweep_points(ref, True) if points is None else points
  return cli.Plan(ref, points, str(root), list(extra), "fake_trainer")


# ----------------------------------------------------------------------------- expansion


def test_sweep_product_names_groups_and_seeds():
  points = sweep.expand(
    [
      config_lib.axis("optim.lr", [1e-5, 3e-5], name="lr"),
      config_lib.axis("freeze", [0, 4]),
      config_lib.seeds(2),
    ]
  )
  assert [p.name for p in points][:3] == [
    "lr=1e-05,freeze=0,seed=0",
    "lr=1e-05,freeze=0,seed=1",
    "lr=1e-05,freeze=4,seed=0",
  ]
  assert len(points) == 8 and len({p.group for p in points}) == 4
  assert points[1].group == "lr=1e-05,freeze=0" and points[1].seed == 1
  assert points[1].overrides == {"optim.lr": 1e-5, "freeze": 0, "seed": 1}
  assert [p.index for p in points] == list(range(8))


def test_sweep_dict_of_axes_and_list_of_dicts():
  by_dict = sweep.expand({"config.optim.lr": [1e-3, 1e-4], "seed": [0, 1, 2]})
  assert len(by_dict) == 6 and by_dict[0].overrides == {"optim.lr": 1e-3, "seed": 0}
  by_list = sweep.expand([{"model.frozen": ("a", "b"), "seed": 0}, {"model.frozen": (), "seed": 0}])
  # Constant keys are left out of names; tuples are joined.
  assert [p.name for p in by_list] == ["frozen=a-b", "frozen=_"]
  assert sweep.expand([{}])[0].name == "default"


def test_sweep_value_labels_survive_product():
  freeze = {"none": (), "bottom4": ("encoder/embeddings/.*", "encoder/layer_[0-3]/.*")}
  points = sweep.expand(
    config_lib.product(
      config_lib.axis("optim.freeze", freeze, name="freeze"), config_lib.seeds([7, 8])
    )
  )
  assert [p.name for p in points] == [
    "freeze=none,seed=7",
    "freeze=none,seed=8",
    "freeze=bottom4,seed=7",
    "freeze=bottom4,seed=8",
  ]
  assert points[2].overrides["optim.freeze"] == freeze["bottom4"]
  assert points[3].group == "freeze=bottom4" and points[3].seed == 8
  by_dict = sweep.expand({"optim.freeze": freeze, "seed": [0]})
  assert [p.name for p in by_dict] == ["freeze=none", "freeze=bottom4"]


def test_sweep_zipped_and_ambiguous_short_names():
  points = sweep.expand(
    config_lib.product(
      config_lib.zipped(
        config_lib.axis("optim.lr", [1, 2]), config_lib.axis("optim.warmup", [10, 20])
      ),
      config_lib.axis("a.size", [1, 2]),
      config_lib.axis("b.size", [3, 4]),
    )
  )
  assert points[0].name == "lr=1,warmup=10,a.size=1,b.size=3"
  with pytest.raises(ValueError, match="differ in length"):
    config_lib.zipped(config_lib.axis("x", [1]), config_lib.axis("y", [1, 2]))
  with pytest.raises(ValueError, match="duplicate"):
    sweep.expand([{"x": 1}, {"x": 1}])


def test_sweep_trainer_args_format_values():
  ref = sweep.ConfigRef.parse(f"{FAKE_CONFIG}:quick")
  p = sweep.Point("p", {"optim.lr": 1e-5, "fail": True, "names": ("a", "b"), "s": "x y"}, "p")
  args = sweep.trainer_args(ref, p, "runs/p", ["--config.steps=3"])
  assert args == [
    f"--config={FAKE_CONFIG}:quick",
    "--workdir=runs/p",
    "--config.steps=3",
    "--config.optim.lr=1e-05",
    "--config.fail=true",
    "--config.names=('a', 'b')",
    "--config.s=x y",
  ]
  assert ref.experiment == "fake_exp_quick"
  assert sweep.point_workdir("runs/", ref, p) == "runs/fake_exp_quick/p"
  assert sweep.point_workdir("gs://b/runs/", ref, p) == "gs://b/runs/fake_exp_quick/p"


def test_sweep_points_validate_keys_and_config_errors(tmp_path):
  ref = sweep.ConfigRef.parse(str(FAKE_CONFIG))
  assert len(sweep.sweep_points(ref, True)) == 8
  assert [p.name for p in sweep.sweep_points(ref, False)] == ["default"]
  bad = tmp_path / "bad.py"
  bad.write_text(FAKE_CONFIG.read_text() + "\n\ndef get_sweep():\n  return [{'optim.lrr': 1}]\n")
  with pytest.raises(KeyError, match=r"optim\.lrr"):
    sweep.sweep_points(sweep.ConfigRef.parse(str(bad)), True)
  with pytest.raises(FileNotFoundError):
    sweep.ConfigRef.parse("configs/does_not_exist.py:smoke")


# ----------------------------------------------------------------------------- local launcher


def test_sweep_local_slots_and_free_gpus(tmp_path, monkeypatch):
  assert local.make_slots(None, 3) == [{}, {}, {}]
  slots = local.make_slots(["0", "2", "3"], 1)
  assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "2", "3"]
  assert slots[0]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # same numbering as nvidia-smi
  slots = local.make_slots(["0", "1", "2"], 1, gpus_per_point=2)
  assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1"]
  assert local.make_slots([], 4) == []  # every GPU busy: no slot, not a silent CPU fallback
  smi = tmp_path / "nvidia-smi"
  smi.write_text("#!/bin/sh\nprintf '0, 12, 0\\n1, 30000, 97\\n2, 3, 0\\n3, 5, 1\\n'\n")
  smi.chmod(0o755)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert local.free_gpus(str(smi)) == ["0", "2", "3"]
  assert local.free_gpus(str(smi), visible="1,2") == ["2"]
  assert local.free_gpus(str(smi), visible="1") == []
  assert local.free_gpus(str(smi), visible="") is None
  assert local.free_gpus(str(tmp_path / "missing")) is None


def test_sweep_local_runs_skips_and_survives_a_failure(tmp_path):
  ref = sweep.ConfigRef.parse(f"{FAKE_CONFIG}:quick")
  points = [
    sweep.Point("ok", {"seed": 0}, "ok", 0, 0),
    sweep.Point("bad", {"fail": True}, "bad", None, 1),
    sweep.Point("ok2", {"seed": 1}, "ok2", 1, 2),
  ]
  plan = cli.Plan(ref, points, str(tmp_path), [], "fake_trainer")
  outcomes = local.run_points(plan, local.make_slots(None, 2), env=fake_env(), progress=False)
  assert [o.status for o in outcomes] == ["done", "failed", "done"]
  bad_log = (tmp_path / "fake_exp_quick" / "bad" / "launch.log").read_text()
  assert "failing on purpose" in bad_log and "exit code 3" in bad_log
  info = json.loads((tmp_path / "fake_exp_quick" / "ok2" / "launch.json").read_text())
  assert info["seed"] == 1 and info["group"] == "ok2"
  # Relaunch: finished points are skipped, the failed one runs again (and fails again).
  again = local.run_points(plan, local.make_slots(None, 2), env=fake_env(), progress=False)
  assert [o.status for o in again] == ["skipped", "failed", "skipped"]


def test_sweep_local_cli_kill_and_resume(tmp_path):
  """The launcher killed mid-run stops its points; relaunching resumes, not restarts."""
  cmd = [
    sys.executable,
    "-m",
    "launch.local",
    f"--config={FAKE_CONFIG}",
    "--sweep",
    f"--workdir={tmp_path}",
    "--entry=fake_trainer",
    "--parallel=2",
    "--points=^lr=0.001,freeze=0,",
    "--config.sleep=0.25",
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, env=fake_env(), stderr=subprocess.PIPE, text=True)
  exp = tmp_path / "fake_exp"
  ckpt = exp / "lr=0.001,freeze=0,seed=0" / "checkpoints" / "step.json"
  deadline = time.time() + 60
  while time.time() < deadline:
    if ckpt.exists() and json.loads(ckpt.read_text() or '{"step": 0}')["step"] >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert not (exp / "lr=0.001,freeze=0,seed=0" / "results.json").exists()
  stopped_at = json.loads(ckpt.read_text())["step"]
  assert 2 <= stopped_at < 6

  res = subprocess.run(cmd, cwd=REPO, env=fake_env(), capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert "(resumed)" in res.stdout
  results = json.loads((exp / "lr=0.001,freeze=0,seed=0" / "results.json").read_text())
  assert results["resumed_from"] >= stopped_at
  log = (exp / "lr=0.001,freeze=0,seed=0" / "launch.log").read_text()
  assert "stopped by the launcher" in log and "resuming from the workdir's checkpoint" in log
  assert f"resumed from step {results['resumed_from']}" in log
  lines = (exp / "lr=0.001,freeze=0,seed=0" / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(x)["step"] for x in lines if '"train"' in x]
  # Each train step logged once (one more at most, if the kill fell between log and
  # checkpoint); a restart would have logged steps 1..stopped_at twice.
  assert sorted(set(steps)) == list(range(1, 7)) and len(steps) <= 7

  # A third launch has nothing to do.
  res = subprocess.run(cmd, cwd=REPO, env=fake_env(), capture_output=True, text=True, timeout=60)
  assert res.returncode == 0 and res.stdout.count("skipped") == 2


def test_sweep_local_dry_run_prints_commands(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  rc = local.main(
    [
      "--config=tests/fixtures/launch/fake_exp.py:quick",
      "--sweep",
      f"--workdir={tmp_path}",
      "--gpus=0,1",
      "--python=python",
      "--dry-run",
    ]
  )
  out = capsys.readouterr().out.splitlines()
  assert rc == 0 and len(out) == 8
  assert out[0] == (
    "CUDA_VISIBLE_DEVICES=0 python -m research.main "
    "--config=tests/fixtures/launch/fake_exp.py:quick "
    f"--workdir={tmp_path}/fake_exp_quick/lr=0.001,freeze=0,seed=0 "
    "--config.optim.lr=0.001 --config.freeze=0 --config.seed=0"
  )
  assert out[1].startswith("CUDA_VISIBLE_DEVICES=1 ")


def test_sweep_variants_name_points_by_label_and_pass_only_config_keys():
  methods = config_lib.variants(
    "method",
    {
      "full": {},
      "probe": {"optim.freeze": ("encoder/.*",), "config.optim.lr": 1e-3},
      "lora": {"model.peft.method": "lora", "optim.lr": 1e-3},
    },
  )
  points = sweep.expand(config_lib.product(methods, config_lib.seeds(2), {"train.steps": 5}))
  assert [p.name for p in points] == [
    "method=full,seed=0",
    "method=full,seed=1",
    "method=probe,seed=0",
    "method=probe,seed=1",
    "method=lora,seed=0",
    "method=lora,seed=1",
  ]
  assert [p.group for p in points[::2]] == ["method=full", "method=probe", "method=lora"]
  assert points[2].overrides == {
    "optim.freeze": ("encoder/.*",),
    "optim.lr": 1e-3,
    "seed": 0,
    "train.steps": 5,
  }
  assert all(not k.startswith(config_lib.TAG) for p in points for k in p.overrides)

"""TPU VM launcher: the exact `gcloud compute tpus tpu-vm` commands of a dry run."""

from pathlib import Path

import pytest

from launch import tpu_vm

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "launch"


def test_tpu_vm_dry_run_matches_expected(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  rc = tpu_vm.main(
    [
      "--config=tests/fixtures/launch/fake_exp.py:quick",
      "--sweep",
      "--points=freeze=0,seed=0",
      "--workdir=gs://my-bucket/runs",
      "--tpu=my-v4-32",
      "--zone=us-central2-b",
      "--project=my-proj",
      "--create",
      "--accelerator-type=v4-32",
      "--spot",
      "--dry-run",
      "--config.steps=100",
    ]
  )
  assert rc == 0
  assert capsys.readouterr().out == (FIXTURES / "expected_tpu_vm.txt").read_text()


def test_tpu_vm_local_workdir_skips_done_points_remotely(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  rc = tpu_vm.main(
    ["--config=tests/fixtures/launch/fake_exp.py", "--workdir=runs", "--setup=", "--dry-run"]
  )
  lines = capsys.readouterr().out.splitlines()
  assert rc == 0 and len(lines) == 3  # mkdir, scp, one run; no create, no setup
  assert all("--worker=all" in line for line in lines)
  assert lines[2].endswith(
    "--command='cd ~/research && test -f runs/fake_exp/default/results.json || "
    "python3 -m research.main --config=tests/fixtures/launch/fake_exp.py "
    "--workdir=runs/fake_exp/default --config.parallel.distributed=true'"
  )


def test_tpu_vm_create_needs_accelerator_type(monkeypatch):
  monkeypatch.chdir(REPO)
  from launch import cli, sweep

  ref = sweep.ConfigRef.parse("tests/fixtures/launch/fake_exp.py")
  plan = cli.Plan(ref, sweep.sweep_points(ref, False), "runs", [], "research.main")
  with pytest.raises(ValueError, match="accelerator-type"):
    tpu_vm.commands(plan, tpu="t", zone="z", create=True, accelerator_type=None)


def test_tpu_vm_runs_commands_and_stops_on_setup_failure(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(
    f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncase "$*" in *scp*) exit 1;; esac\n'
  )
  gcloud.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
  rc = tpu_vm.main(["--config=tests/fixtures/launch/fake_exp.py", "--workdir=runs"])
  assert rc == 1 and "setup step failed" in capsys.readouterr().err
  calls = (tmp_path / "calls").read_text().splitlines()
  assert len(calls) == 2 and calls[1].startswith("compute tpus tpu-vm scp ")

"""Every config file in configs/ loads, in each of its variants, locked; smoke runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_util import REPO, load_config_module

CONFIGS = sorted(
  str(p.relative_to(REPO / "configs").with_suffix(""))
  for p in (REPO / "configs").rglob("*.py")
  if not p.stem.startswith("_")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_in_every_variant(name):
  module = load_config_module(name)
  assert module.__doc__ and "python -m research.main" in module.__doc__
  for variant in getattr(module, "VARIANTS", ("",)):
    config = module.get_config(variant or None)
    assert config.is_locked, (name, variant)
    # The launchers name run directories by the experiment: the config file's name.
    assert config.experiment == Path(name).name and config.tasks, (name, variant)
    with pytest.raises(AttributeError):
      config.train.not_a_field = 1
  with pytest.raises(KeyError, match="unknown config variant"):
    module.get_config("no_such_variant")


def test_sst2_smoke_run_writes_the_contract(tmp_path, shared_data):
  if not (shared_data / "sst2").is_dir():
    pytest.skip("SST-2 not in the data directory")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "research.main",
      "--config=configs/sst2_minilm.py:smoke",
      f"--workdir={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["config"] == "sst2_minilm" and results["steps"] == 20
  assert 0.0 <= results["eval"]["sst2"]["accuracy"] <= 1.0 and "f1" in results["eval"]["sst2"]
  assert results["params"]["total"] == results["params"]["trainable"] > 22_000_000
  assert results["train_examples_per_sec"] > 0 and results["wall_s"] > 0
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"step", "split", "loss"} <= set(lines[0]) and lines[-1]["split"] == "eval"
  for name in ("config.json", "graft_report.txt", "optim_summary.txt"):
    assert Path(tmp_path / name).is_file(), name
  assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # TensorBoard scalars

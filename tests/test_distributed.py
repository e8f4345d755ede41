"""Multi-host: two local processes joined by ``jax.distributed.initialize`` on 127.0.0.1 train the
tiny SST-2 config to the same params as one process.

Each process has 4 CPU devices (8 in all), feeds its half of every global batch and writes
checkpoints collectively; the single-process reference has 8 devices, so the mesh is the same.
Dropout stays on: the encoder's dropout masks depend only on the key and the global position.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_util import REPO, tiny_config

from research import paths
from research.train import checkpoints as ckpt_lib
from research.train.state import build_model, init_fn

CONFIG = f"--config={REPO / 'configs' / 'sst2_minilm.py'}:tiny"
COMMON = ["--config.train.steps=12", "--config.train.eval_every=12"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, devices: int, *flags: str) -> subprocess.Popen:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
  )
  cmd = [sys.executable, "-m", "research.main", CONFIG, f"--workdir={workdir}", *COMMON, *flags]
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"timed out:\n{out[-3000:]}")
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.mark.slow  # ~90 s on 2 busy cores: three processes start, compile and train.
def test_two_processes_train_to_the_same_params_as_one(tmp_path):
  port = free_port()
  multi = [
    launch(
      tmp_path / "multi",
      4,
      "--config.parallel.distributed=True",
      f"--config.parallel.coordinator_address=127.0.0.1:{port}",
      "--config.parallel.num_processes=2",
      f"--config.parallel.process_id={i}",
    )
    for i in range(2)
  ]
  single = launch(tmp_path / "single", 8)
  outs = [finish(p) for p in multi]
  finish(single)
  assert "init: scratch" in outs[0] and "init: scratch" not in outs[1]  # process 0 prints
  ours, _ = ckpt_lib.load_params(tmp_path / "multi", prefer="latest")
  ref, _ = ckpt_lib.load_params(tmp_path / "single", prefer="latest")
  ours, ref = paths.flatten(ours), paths.flatten(ref)
  assert ours.keys() == ref.keys()
  for path, value in ref.items():
    np.testing.assert_allclose(ours[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  results = json.loads((tmp_path / "multi" / "results.json").read_text())
  assert results["steps"] == 12 and results["eval"]["sst2"]["examples"] > 0
  # Sanity: training moved the params away from their (shared) initialisation.
  config = tiny_config()
  model, _ = build_model(config, {"sst2": 2})
  init = paths.flatten(init_fn(model)(jax.random.key_data(jax.random.key(config.seed))))
  assert max(float(np.max(np.abs(ref[p] - np.asarray(v)))) for p, v in init.items()) > 1e-4

"""The supervised program end to end on a tiny model: freezing, resume after a real SIGKILL,
accumulation, config and checkpoint errors, init_from. (Resume, preemption and the non-finite
guard of every program: tests/test_loop.py.)"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from train_util import REPO, make_tiny_minilm_like, max_abs_diff, tiny_config

from research import paths
from research.train import checkpoints as ckpt_lib
from research.train.state import build_model, init_fn
from research.train.trainer import train_and_evaluate
from research.transfer import hf


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  return make_tiny_minilm_like(tmp_path_factory.mktemp("tiny_hf"))


def test_freeze_encoder_keeps_pretrained_bitwise(tiny_hf, tmp_path):
  config = tiny_config(steps=20, checkpoint_every=20, eval_every=0)
  config.model.update(checkpoint=str(tiny_hf), init="pretrained", encoder_overrides={})
  config.optim.update(freeze=("encoder/.*",), lr=1e-2, warmup_fraction=0.0)
  results = train_and_evaluate(config, str(tmp_path))
  assert results["params"]["trainable"] == 32 * 2 + 2
  final, _ = ckpt_lib.load_params(tmp_path, prefer="latest")
  _, pretrained = hf.load_pretrained(tiny_hf)
  for path, value in paths.flatten(pretrained).items():
    np.testing.assert_array_equal(paths.flatten(final)[path], value, err_msg=path)
  model, _ = build_model(config, {"sst2": 2})
  initial = init_fn(model)(jax.random.key_data(jax.random.key(config.seed)))
  assert max_abs_diff(final["heads"], initial["heads"]) > 1e-3
  # No optimizer moments for frozen leaves: the saved optimizer state has no encoder path.
  manager = ckpt_lib.Checkpoints(tmp_path).latest
  opt_paths = list(paths.flatten(manager.item_metadata(20)["state"]["opt_state"]))
  assert opt_paths and not [p for p in opt_paths if "encoder" in p]
  assert any("heads/sst2/output/kernel" in p for p in opt_paths)
  assert "group frozen: 39 leaves" in (tmp_path / "optim_summary.txt").read_text()
  assert "2 left at init" in (tmp_path / "graft_report.txt").read_text()


def test_grad_accum_equals_full_batch():
  from research import optim
  from research.train.state import TrainState
  from research.train.steps import make_train_step

  config = tiny_config()
  model, _ = build_model(config, {"sst2": 2})
  rng = jax.random.key_data(jax.random.key(0))
  params = init_fn(model)(rng)
  # Plain SGD: Adam's first steps are ~lr*sign(g) and would amplify fp noise in tiny grads.
  config.optim.update(name="sgd", momentum=0.9, lr=0.5, warmup_fraction=0.0)
  tx, _ = optim.build(config.optim, params, 10)
  batch = {
    "input_ids": np.random.default_rng(0).integers(1000, 2000, (16, 12)).astype(np.int32),
    "attention_mask": np.ones((16, 12), np.int32),
    "token_type_ids": np.zeros((16, 12), np.int32),
    "labels": np.arange(16, dtype=np.int32) % 2,
    "example_mask": np.ones(16, np.float32),
  }
  batch["attention_mask"][::3, 8:] = 0
  batch["example_mask"][-3:] = 0  # Padded rows weigh nothing, in any micro-batch.
  out = {}
  for k in (1, 4):
    state = TrainState.create(params, tx, rng)
    step = jax.jit(make_train_step(model, "sst2", "classification", grad_accum=k))
    for _ in range(3):
      state, metrics = step(state, batch)
    out[k] = (state.params, float(metrics["loss"]))
  assert max_abs_diff(out[1][0], out[4][0]) < 1e-6
  np.testing.assert_allclose(out[1][1], out[4][1], rtol=1e-6)


RESUME_SCRIPT = textwrap.dedent("""
  import json, sys, time
  sys.path.insert(0, {tests!r})
  from train_util import batch_digest, tiny_config
  from research.train.trainer import train_and_evaluate
  workdir, record, stall_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
  def hook(step, batch):
    with open(record, "a") as f:
      f.write(json.dumps([step, batch_digest(batch)]) + "\\n")
    if step == stall_at:
      time.sleep(600)  # The test kills us here, after checkpoint 10 is on disk.
    return batch
  config = tiny_config(steps=20, checkpoint_every=10, eval_every=0, log_every=5)
  config.model.dropout = 0.1  # Dropout on: the RNG must resume too.
  config.tasks.sst2.head.dropout = 0.1
  train_and_evaluate(config, workdir, batch_hook=hook)
""")


def _run(script, *args, wait=True):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
    [sys.executable, "-c", script, *map(str, args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if wait:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
  return proc


def _records(path):
  seen = {}
  for line in path.read_text().splitlines():
    step, digest = json.loads(line)
    seen[step] = digest  # A resumed run re-reads what the killed one had prefetched.
  return seen


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  script = RESUME_SCRIPT.format(tests=str(REPO / "tests"))
  _run(script, tmp_path / "full", tmp_path / "full.jsonl", -1)
  killed = _run(script, tmp_path / "resumed", tmp_path / "killed.jsonl", 12, wait=False)
  deadline = time.time() + 300
  while not (tmp_path / "resumed" / "checkpoints" / "10").is_dir():
    assert killed.poll() is None, killed.stdout.read()[-3000:]
    assert time.time() < deadline, "no checkpoint 10 within 300 s"
    time.sleep(0.2)
  time.sleep(1.0)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "resumed" / "checkpoints" / "20").exists()
  _run(script, tmp_path / "resumed", tmp_path / "resumed.jsonl", -1)
  full, _ = ckpt_lib.load_params(tmp_path / "full", prefer="latest")
  resumed, _ = ckpt_lib.load_params(tmp_path / "resumed", prefer="latest")
  assert max_abs_diff(full, resumed) <= 1e-6
  seen_full, seen_resumed = _records(tmp_path / "full.jsonl"), _records(tmp_path / "resumed.jsonl")
  assert min(seen_resumed) == 10  # Resumed at step 10 (0-based batch index)...
  for step in range(10, 20):  # ...and saw the very batches the uninterrupted run saw.
    assert seen_resumed[step] == seen_full[step], step
  assert {s: d for s, d in _records(tmp_path / "killed.jsonl").items() if s < 10} == {
    s: seen_full[s] for s in range(10)
  }


def test_misspelt_override_names_valid_keys(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "research.main",
      "--config=configs/sst2_minilm.py:tiny",
      f"--workdir={tmp_path}",
      "--config.optim.lrr=1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0
  assert "lrr" in out.stderr and "'lr'" in out.stderr and "warmup_steps" in out.stderr


def test_workdir_of_another_model_fails_naming_path(tmp_path):
  train_and_evaluate(tiny_config(steps=2, checkpoint_every=2, eval_every=0), str(tmp_path))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  other = tiny_config(steps=4, checkpoint_every=2, eval_every=0)
  other.model.encoder_overrides = dict(
    num_layers=2, hidden_size=48, num_heads=4, intermediate_size=64
  )
  with pytest.raises(
    ckpt_lib.CheckpointMismatchError,
    match=r"encoder/embeddings/layer_norm/bias has shape \(32,\) in the "
    r"checkpoint but \(48,\) in this model",
  ):
    train_and_evaluate(other, str(tmp_path))
  # The first run's files are byte-identical: the check comes before anything is written.
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_init_from_previous_run_grafts_its_params(tmp_path, monkeypatch):
  from research.transfer import graft as graft_lib

  first = tiny_config(steps=4, checkpoint_every=4, eval_every=4)
  train_and_evaluate(first, str(tmp_path / "a"))
  source = paths.flatten(ckpt_lib.load_params(tmp_path / "a")[0])
  encoder = sorted(p for p in source if p.startswith("encoder/"))
  heads = ["heads/sst2/output/bias", "heads/sst2/output/kernel"]
  assert len(encoder) == 39 and sorted(source) == sorted(encoder + heads)

  grafts = []  # (fresh init, grafted) params, copied to the host before the step donates them

  real_graft = graft_lib.graft

  def spy(target, *args, **kwargs):
    grafted, report = real_graft(target, *args, **kwargs)
    copy = lambda tree: {k: np.array(v, copy=True) for k, v in paths.flatten(tree).items()}
    grafts.append((copy(target), copy(grafted)))
    return grafted, report

  monkeypatch.setattr(graft_lib, "graft", spy)
  second = tiny_config(steps=1, checkpoint_every=1, eval_every=0)
  second.init_from = str(tmp_path / "a")
  second.optim.freeze = ("encoder/.*",)
  results = train_and_evaluate(second, str(tmp_path / "b"))
  assert results["init"].startswith(f"grafted from run checkpoint {tmp_path / 'a'}/")

  # The report a user reads: every encoder leaf from the same path, the new head at init.
  lines = (tmp_path / "b" / "graft_report.txt").read_text().splitlines()
  rows = [(line[:23].strip(), *line[24:].split()) for line in lines[2:-1]]
  assert sorted(r[1:] for r in rows if r[0] == "transferred") == [(p, p) for p in encoder]
  assert sorted(r[1] for r in rows if r[0] == "left at init") == heads
  assert sorted(r[2] for r in rows if r[0] == "unused in source") == heads
  assert len(rows) == 39 + 2 + 2
  assert lines[-1] == (
    "graft: 39 transferred, 2 left at init, 2 unused in source, 0 re-initialised (shape mismatch)"
  )

  # Before training: the encoder is the source run's, bit for bit; the head is the fresh init.
  assert len(grafts) == 1
  init, grafted = grafts[0]
  assert sorted(grafted) == sorted(source)
  for p in encoder:
    np.testing.assert_array_equal(grafted[p], source[p], err_msg=p)
  for p in heads:
    np.testing.assert_array_equal(grafted[p], init[p], err_msg=p)
    assert np.max(np.abs(grafted[p] - source[p])) > 1e-5, p  # not the source run's head
  # After the step: the frozen encoder is unchanged bitwise; the head trained.
  final = paths.flatten(ckpt_lib.load_params(tmp_path / "b", prefer="latest")[0])
  for p in encoder:
    np.testing.assert_array_equal(final[p], source[p], err_msg=p)
  assert np.max(np.abs(final["heads/sst2/output/kernel"] - init["heads/sst2/output/kernel"])) > 1e-5

"""Multi-task training: the task schedule, a tiny two-task run end to end, and no
recompilation when steps switch between tasks (exact resume: tests/test_loop.py)."""

import json

import numpy as np
import optax
import pytest
from test_compile_count import run_counting
from train_util import load_config_module

from research.train import checkpoints as ckpt_lib
from research.train import multitask
from research.train.trainer import train_and_evaluate

SIZES = {"sst2": 67349, "conll03": 14041, "small": 900}


def tiny_config(**train):
  """The two-task ``tiny`` variant (random 2-layer encoder, SST-2 and CoNLL fixtures)."""
  config = load_config_module("multitask_sst2_conll").get_config("tiny")
  config.train.update(train)
  return config


@pytest.mark.parametrize(
  "sampling, expected",
  [
    ("proportional", np.array([67349, 14041, 900]) / 82290),
    ("temperature", np.sqrt([67349, 14041, 900]) / np.sqrt([67349, 14041, 900]).sum()),
    ("round_robin", np.full(3, 1 / 3)),
    ("weights", np.array([1, 2, 1]) / 4),
  ],
)
def test_schedule_matches_the_configured_shares(sampling, expected):
  weights = {"sst2": 1, "conll03": 2, "small": 1}
  probs = multitask.task_probs(SIZES, sampling, temperature=2.0, weights=weights)
  np.testing.assert_allclose(list(probs.values()), expected, rtol=1e-9)
  order = multitask.schedule(probs, 1000, seed=3, round_robin=sampling == "round_robin")
  shares = np.bincount(order, minlength=3) / 1000
  np.testing.assert_allclose(shares, expected, atol=0.02)
  # Every prefix holds each task near its share, not just the whole run (stratified).
  for n in (100, 250, 500):
    np.testing.assert_allclose(np.bincount(order[:n], minlength=3) / n, expected, atol=0.02)


def test_schedule_is_pure_seeded_and_prefix_stable():
  probs = multitask.task_probs(SIZES, "temperature", 2.0)
  a = multitask.schedule(probs, 1000, seed=0)
  np.testing.assert_array_equal(a, multitask.schedule(probs, 1000, seed=0))
  np.testing.assert_array_equal(a[:437], multitask.schedule(probs, 437, seed=0))
  assert not np.array_equal(a, multitask.schedule(probs, 1000, seed=1))
  assert set(a[:100].tolist()) == {0, 1, 2}  # Shuffled in blocks: all tasks early on.
  rr = multitask.schedule(probs, 7, round_robin=True)
  np.testing.assert_array_equal(rr, [0, 1, 2, 0, 1, 2, 0])


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="expected one of"):
    multitask.task_probs(SIZES, "uniform")
  with pytest.raises(ValueError, match="needs a weight"):
    multitask.task_probs(SIZES, "weights", weights={"sst2": 1.0})
  config = tiny_config()
  config.multitask.loss_weights.unlock()
  config.multitask.loss_weights.nope = 2.0
  with pytest.raises(ValueError, match="not in tasks"):
    multitask.settings(config)


def test_loss_weight_scales_the_update():
  tx = optax.sgd(0.1)
  params, grads = {"w": np.ones(3, np.float32)}, {"w": np.full(3, 2.0, np.float32)}
  state = tx.init(params)
  plain, _ = tx.update(grads, state, params)
  scaled, _ = multitask.weighted_tx(tx, 0.5).update(grads, state, params)
  np.testing.assert_allclose(scaled["w"], 0.5 * plain["w"])


def test_two_task_run_end_to_end(tmp_path):
  config = tiny_config(log_every=5, checkpoint_every=0)
  config.multitask.loss_weights.conll03 = 2.0
  results = train_and_evaluate(config, str(tmp_path))
  assert sorted(results["tasks"]) == ["conll03", "sst2"] and results["steps"] == 20
  assert sum(results["task_steps"].values()) == 20 and min(results["task_steps"].values()) > 0
  assert 0.0 <= results["eval"]["sst2"]["accuracy"] <= 1.0
  assert 0.0 <= results["eval"]["conll03"]["f1"] <= 1.0
  assert set(json.loads((tmp_path / "labels.json").read_text())) == {"sst2", "conll03"}
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["task"] for r in records if r["split"] == "eval"} == {"sst2", "conll03"}
  train = [r for r in records if r["split"] == "train"]
  assert len(train) == 4 and all(np.isfinite(r["loss"]) for r in train)
  assert any("sst2/loss" in r for r in train) and any("conll03/loss" in r for r in train)
  # best_metric names one task's metric; the best params hold both heads.
  best, where = ckpt_lib.load_params(tmp_path, prefer="best")
  assert "/best/" in where and set(best["heads"]) == {"sst2", "conll03"}


def test_no_compilation_after_warmup_across_task_switches(tmp_path):
  config = tiny_config()
  config.multitask.sampling = "round_robin"  # A task switch at every step.
  counter = run_counting(config, tmp_path)
  assert counter["count"] == 0, counter["events"]

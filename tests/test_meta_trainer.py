"""The meta-learning trainer end to end on the tiny config (``pytest -k maml``).

``configs/intent_fewshot_maml.py:tiny``: a 2-layer random encoder, 3-way 1-shot episodes of the
committed BANKING77 fixture, 8 episodes per meta-step over the 8 fake CPU devices.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from train_util import load_config_module, max_abs_diff

from research.meta import report, trainer
from research.train import checkpoints as ckpt_lib


def tiny(arg: str = "tiny", **meta):
  config = load_config_module("intent_fewshot_maml").get_config(arg)
  config.meta.update(meta)
  return config


@pytest.mark.parametrize(
  "algorithm",
  [
    "anil",
    pytest.param("maml", marks=pytest.mark.slow),
    pytest.param("reptile", marks=pytest.mark.slow),
    pytest.param("imaml", marks=pytest.mark.slow),
  ],
)
def test_meta_trainer_tiny_runs_and_resumes_exactly(tmp_path, algorithm):
  """ANIL in the default suite (its second-order graph is small); MAML, Reptile and iMAML
  (``:tiny,algorithm=imaml``): -m slow."""
  full = tiny(algorithm=algorithm)
  results = trainer.train_and_evaluate(full, str(tmp_path / "full"))
  test = results["eval"]["banking77"]
  assert results["steps"] == 4 and test["episodes"] == 16
  assert 0.0 <= test["accuracy"] <= 1.0 and test["ci95"] > 0
  assert results["params"]["total"] == results["params"]["trainable"] > 0
  saved = json.loads((tmp_path / "full" / "results.json").read_text())
  assert saved["meta"]["algorithm"] == algorithm and saved["meta"]["k_shot"] == 1
  lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert {x["split"] for x in lines} == {"train", "valid", "test"}
  assert all(np.isfinite(x["loss"]) for x in lines if x["split"] == "train")

  # Killed after step 2: a copy of the run without its step-4 checkpoint resumes to the same
  # trajectory, bitwise (state, RNG and episode iterator position come from the checkpoint).
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
  shutil.rmtree(tmp_path / "resumed" / "best", ignore_errors=True)
  resumed = trainer.train_and_evaluate(tiny(algorithm=algorithm), str(tmp_path / "resumed"))
  a, _ = ckpt_lib.load_params(tmp_path / "full", prefer="latest")
  b, _ = ckpt_lib.load_params(tmp_path / "resumed", prefer="latest")
  assert max_abs_diff(a, b) == 0.0
  assert resumed["init"].startswith("resumed from")
  np.testing.assert_array_equal(
    np.load(tmp_path / "full" / "test_episode_accuracy.npy"),
    np.load(tmp_path / "resumed" / "test_episode_accuracy.npy"),
  )


def test_maml_bad_episode_shapes_name_class_and_counts(tmp_path):
  with pytest.raises(ValueError, match=r"n_way=4 but class split 'banking77/01/train' has only 3"):
    trainer.train_and_evaluate(tiny(n_way=4), str(tmp_path / "n"))
  # atm_support, a meta-test class of the fixture, has 5 examples; 4 + 2 are needed.
  with pytest.raises(ValueError, match=r"k_shot=4 \+ q_query=2 = 6 .*'atm_support' has 5"):
    trainer.train_and_evaluate(tiny(k_shot=4), str(tmp_path / "k"))


@pytest.mark.parametrize(
  "algorithm", ["protonet", pytest.param("finetune", marks=pytest.mark.slow)]
)
def test_maml_baselines_skip_meta_training(tmp_path, algorithm):
  """The baselines score the same test episodes without any meta-step."""
  results = trainer.train_and_evaluate(tiny(algorithm=algorithm), str(tmp_path))
  assert results["steps"] == 0 and results["meta"]["algorithm"] == algorithm
  assert np.load(tmp_path / "test_episode_accuracy.npy").shape == (16,)


def test_maml_report_pairs_methods_with_finetune_on_the_same_episodes(tmp_path):
  """The report's paired difference: mean and 1.96 SE of per-episode differences."""
  rng = np.random.default_rng(0)
  base = rng.uniform(0.4, 1.0, 600)
  better = np.clip(base + rng.choice([0.0, 0.2], 600), 0, 1)
  for algorithm, accs in (("finetune", base), ("anil", better)):
    run = tmp_path / algorithm
    run.mkdir()
    np.save(run / "test_episode_accuracy.npy", accs)
    meta = dict(algorithm=algorithm, data="banking77", n_way=5, k_shot=1, test_seed=1234)
    results = {"eval": {"banking77": trainer.mean_ci95(accs)}, "steps": 0, "meta": meta}
    (run / "results.json").write_text(json.dumps(results))
  out = tmp_path / "table.json"
  assert report.main([str(tmp_path), f"--json={out}"]) == 0
  cells = json.loads(out.read_text())["banking77 5-way 1-shot"]
  d = better - base
  assert cells["anil"]["vs_finetune"]["difference"] == pytest.approx(d.mean())
  assert cells["anil"]["vs_finetune"]["ci95"] == pytest.approx(1.96 * d.std(ddof=1) / 600**0.5)
  assert "vs_finetune" not in cells["finetune"]
  assert cells["anil"]["accuracy"] == pytest.approx(better.mean())


def test_maml_meta_test_resumes_after_a_kill(tmp_path, monkeypatch):
  """A meta-test killed after its first batch continues from the saved scores and position."""
  config = tiny(algorithm="protonet")  # No meta-training: the test is the whole run.
  full = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  expected = np.load(tmp_path / "full" / "test_episode_accuracy.npy")
  assert not (tmp_path / "full" / "meta_test_progress.json").exists()  # Removed when done.

  save = trainer.MetaTestProgress.save

  def save_then_die(self, scores, it):
    save(self, scores, it)
    raise KeyboardInterrupt

  run = tmp_path / "killed"
  with monkeypatch.context() as m:
    m.setattr(trainer.MetaTestProgress, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
      trainer.train_and_evaluate(config, str(run))
  progress = json.loads((run / "meta_test_progress.json").read_text())
  assert [len(b) for b in progress["accuracies"]] == [8]  # One batch of 8 episodes scored.
  np.testing.assert_array_equal(progress["accuracies"][0], expected[:8])

  # Mark the saved scores: the rerun must take them from the file and score only the rest.
  progress["accuracies"][0] = [0.125] * 8
  (run / "meta_test_progress.json").write_text(json.dumps(progress))
  resumed = trainer.train_and_evaluate(config, str(run))
  accs = np.load(run / "test_episode_accuracy.npy")
  np.testing.assert_array_equal(accs[:8], np.full(8, 0.125, np.float32))
  np.testing.assert_array_equal(accs[8:], expected[8:])
  assert resumed["eval"]["banking77"]["episodes"] == full["eval"]["banking77"]["episodes"] == 16
  assert resumed["test_wall_s"] > progress["wall_s"] > 0  # The killed run's share counts.


def test_maml_meta_test_progress_for_other_params_is_ignored(tmp_path):
  """A progress file keyed by other params or settings never mixes into new scores."""

  class Iterator:
    def __init__(self):
      self.state = None

    def get_state(self):
      return {"position": 1}

    def set_state(self, state):
      self.state = state

  path, logs = tmp_path / "progress.json", []
  progress = lambda step: trainer.MetaTestProgress(
    path, {"step": step, "meta": {"inner": ()}}, logs.append, write=True
  )
  progress(4).save([np.array([0.5, 1.0], np.float32)], Iterator())
  it, same = Iterator(), progress(4)
  np.testing.assert_array_equal(np.concatenate(same.resume(it)), [0.5, 1.0])
  assert it.state == {"position": 1} and "resuming after 2 episodes" in logs[-1]
  it = Iterator()
  assert progress(5).resume(it) == [] and it.state is None and "starting over" in logs[-1]
  path.write_text("{truncated")
  assert same.resume(Iterator()) == [] and "unreadable" in logs[-1]
  same.done()
  assert not path.exists()

"""MAML with a LoRA inner loop (``configs/intent_fewshot_maml.py:inner=lora``): ``pytest -k lora``.

The inner loop adapts only the LoRA matrices and the head (the paths of
``research.transfer.peft.trainable_rules``); the outer loop meta-learns their initialisation.
The second-order meta-gradient is checked against ``jax.grad`` through an independently written
python-loop inner SGD over the same leaves, and a meta-step with the optimizer's LoRA freeze
mask leaves every base weight bitwise where it was.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_meta_algorithms import ENC, LR, TASK, jit, learner, make_episode, max_rel, plain_loss
from train_util import load_config_module

from research import optim, paths
from research.meta import trainer
from research.meta.steps import make_meta_step, meta_gradient
from research.models.config import PeftConfig
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.train import checkpoints as ckpt_lib
from research.train.state import TrainState
from research.transfer import peft

LORA = PeftConfig(method="lora", lora_rank=2, lora_alpha=4.0)
INNER = peft.trainable_rules(LORA, (TASK,))


def is_inner(path: str) -> bool:
  return paths.match([(p, True) for p in INNER], path, False)


@pytest.fixture(scope="module")
def lora_setup():
  model = make_task_model(
    ENC.replace(peft=LORA), {TASK: HeadConfig(num_labels=3, pooling="mean", dropout=0.0)}
  )
  params = jit(lambda r: init_params(model, r, 6))(jax.random.key(0))
  # LoRA's B starts at zero; a random B (and a larger head) makes every second-order term live.
  rng = np.random.default_rng(0)
  flat = paths.flatten(params)
  for path, leaf in flat.items():
    if path.endswith("lora_b"):
      flat[path] = jnp.asarray(rng.standard_normal(leaf.shape) * 0.5, leaf.dtype)
    if path.startswith("heads/"):
      flat[path] = leaf * 25.0
  params = paths.unflatten(flat)
  assert sum(path.endswith("lora_a") for path in flat) == 2 * ENC.num_layers  # query, value
  return model, params, make_episode(0)


def unrolled_reference(model, params, ep, steps: int = 2):
  """Query loss after ``steps`` python-loop SGD steps on the inner leaves only."""
  flat = paths.flatten(params)
  ls = lambda f: plain_loss(model, paths.unflatten(f), ep, "support_")
  for _ in range(steps):
    grads = jax.grad(ls)(flat)
    flat = {k: v - LR * grads[k] if is_inner(k) else v for k, v in flat.items()}
  return plain_loss(model, paths.unflatten(flat), ep, "query_")


@pytest.mark.parametrize("hvp", ["reverse", pytest.param("forward", marks=pytest.mark.slow)])
def test_lora_maml_second_order_meta_gradient_equals_unrolled_python_loop(lora_setup, hvp):
  model, params, ep = lora_setup
  lrn = learner(model, inner=INNER, hvp=hvp)
  got = jit(jax.grad(lambda p: lrn.query_loss(p, ep)[0]))(params)
  ref = jit(jax.grad(unrolled_reference, argnums=1), static_argnums=0)(model, params, ep)
  assert max_rel(got, ref) < 1e-5
  # Every part of it matters: the base weights get a meta-gradient through the LoRA loop, and
  # dropping the second-order terms changes the LoRA/head meta-gradient.
  base = [v for k, v in paths.flatten(got).items() if not is_inner(k)]
  assert float(optax.global_norm(base)) > 0
  fo = jit(jax.grad(lambda p: learner(model, inner=INNER, first_order=True).query_loss(p, ep)[0]))
  assert max_rel(fo(params), ref) > 1e-2


def test_lora_maml_meta_steps_leave_frozen_base_weights_bitwise(lora_setup):
  """With the optimizer's LoRA rules, frozen leaves get no meta-gradient (stopped in the step)
  and stay bitwise; the LoRA and head meta-gradients are those of the unfrozen computation."""
  model, params, _ = lora_setup
  cfg = ml_collections.ConfigDict(optim.default_config())
  cfg.update(lr=1e-2, trainable=INNER, schedule="constant", warmup_fraction=0.0)
  tx, _ = optim.build(cfg, params, 10)
  labels = paths.flatten(optim.freeze_labels(cfg, params))
  frozen = [k for k, label in labels.items() if label == optim.FROZEN]
  assert frozen and all(not is_inner(k) for k in frozen)
  lrn = learner(model, inner=INNER)
  lrn_frozen = type(lrn)(model, TASK, lrn.s, frozen=frozen)
  episodes = [make_episode(s) for s in (3, 4)]
  batch = {k: np.stack([e[k] for e in episodes]) for k in episodes[0]}

  full, _ = jit(lambda p: meta_gradient(lrn, p, batch))(params)
  stopped, _ = jit(lambda p: meta_gradient(lrn_frozen, p, batch))(params)
  full, stopped = paths.flatten(full), paths.flatten(stopped)
  for k in full:
    if k in frozen:
      assert not np.any(np.asarray(stopped[k])), k
    else:
      np.testing.assert_allclose(stopped[k], full[k], rtol=1e-5, atol=1e-7, err_msg=k)

  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(0)))
  step = jit(make_meta_step(lrn_frozen))
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  before, after = paths.flatten(params), paths.flatten(state.params)
  for k in before:
    same = np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
    assert same == (k in frozen), k


@pytest.mark.slow
def test_lora_maml_tiny_trainer_keeps_base_weights(tmp_path):
  """``:tiny,inner=lora`` through the meta trainer: the base weights of the step-2 and step-4
  checkpoints are bitwise equal, the LoRA matrices moved."""
  config = load_config_module("intent_fewshot_maml").get_config("tiny,inner=lora")
  results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["steps"] == 4 and results["params"]["trainable"] < results["params"]["total"]
  shutil.copytree(tmp_path / "run", tmp_path / "at2")
  shutil.rmtree(tmp_path / "at2" / "checkpoints" / "4")
  shutil.rmtree(tmp_path / "at2" / "best", ignore_errors=True)
  a, _ = ckpt_lib.load_params(tmp_path / "at2", prefer="latest")
  b, _ = ckpt_lib.load_params(tmp_path / "run", prefer="latest")
  a, b = paths.flatten(a), paths.flatten(b)
  moved = {k for k in a if not np.array_equal(a[k], b[k])}
  assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]

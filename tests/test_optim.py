"""Optimizer groups: freezing, LLRD, gradual unfreezing, weight-decay masks, rule errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import optim, paths
from research.models.config import EncoderConfig
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model


@pytest.fixture(scope="module")
def params():
  model = make_task_model(EncoderConfig.tiny(num_layers=4), {"cls": HeadConfig(num_labels=3)})
  return init_params(model, jax.random.key(0))


def sgd_config(**kw):
  c = optim.default_config()
  c.update(
    name="sgd",
    momentum=0.0,
    lr=0.1,
    weight_decay=0.0,
    clip_norm=0.0,
    schedule="constant",
    warmup_steps=0,
    warmup_fraction=0.0,
  )
  c.update(kw)
  return c


def one_step(cfg, params, step_count=1):
  tx, _ = optim.build(cfg, params, total_steps=100)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(step_count):
    updates, state = tx.update(grads, state, params)
  return paths.flatten(updates), state


def test_freeze_has_no_state_and_zero_updates(params):
  cfg = optim.default_config()
  cfg.update(freeze=("encoder/.*",), warmup_fraction=0.0)
  tx, summary = optim.build(cfg, params, total_steps=10)
  state = tx.init(params)
  state_paths = list(paths.flatten(state))
  assert not any("encoder/" in p for p in state_paths), state_paths[:5]
  head = ["heads/cls/output/bias", "heads/cls/output/kernel"]
  for moment in ("/mu/", "/nu/"):  # Adam's moments: exactly the head's two leaves
    assert sorted(p.split(moment)[1] for p in state_paths if moment in p) == head, moment
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  for p, u in paths.flatten(updates).items():
    assert bool(jnp.all(u == 0)) == p.startswith("encoder/"), p
  assert summary[0].endswith(": 2 leaves, 99 params"), summary
  assert summary[1:] == [
    "group frozen: 71 leaves, 41,504 params",
    "params: 41,603 total, 99 trainable",
  ]


def test_freeze_everything_is_an_error(params):
  cfg = optim.default_config()
  cfg.freeze = (".*",)
  with pytest.raises(ValueError, match="every parameter is frozen"):
    optim.build(cfg, params, total_steps=10)


def test_freeze_rule_matching_nothing_is_an_error(params):
  cfg = optim.default_config()
  cfg.freeze = ("encoder/layers_0/.*",)  # Typo: the paths say layer_0.
  with pytest.raises(ValueError, match=r"optim.freeze: pattern\(s\) \['encoder/layers_0/\.\*'\]"):
    optim.build(cfg, params, total_steps=10)


def test_llrd_scales_layer_i_by_decay_power(params):
  decay, lr, num_layers = 0.5, 0.1, 4
  updates, _ = one_step(sgd_config(lr=lr, llrd=decay), params)
  for i in range(num_layers):
    u = updates[f"encoder/layer_{i}/attention/query/kernel"]
    np.testing.assert_allclose(u, -lr * decay ** (num_layers - i), rtol=1e-6)
  np.testing.assert_allclose(
    updates["encoder/embeddings/word_embeddings/embedding"],
    -lr * decay ** (num_layers + 1),
    rtol=1e-6,
  )
  np.testing.assert_allclose(updates["heads/cls/output/kernel"], -lr, rtol=1e-6)


def test_lr_multipliers_first_match_wins(params):
  cfg = sgd_config(lr_multipliers=(("heads/.*", 10.0), (".*kernel", 0.5)))
  updates, _ = one_step(cfg, params)
  np.testing.assert_allclose(updates["heads/cls/output/kernel"], -1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["encoder/layer_0/ffn/output/kernel"], -0.05, rtol=1e-6)
  np.testing.assert_allclose(updates["encoder/layer_0/ffn/output/bias"], -0.1, rtol=1e-6)


def test_gradual_unfreezing_thaws_top_down(params):
  cfg = optim.default_config()
  cfg.update(unfreeze=(("encoder/layer_[23]/.*", 2), ("encoder/.*", 4)), warmup_steps=1)
  tx, summary = optim.build(cfg, params, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  moved = []
  for _ in range(5):
    updates, state = tx.update(grads, state, params)
    flat = paths.flatten(updates)
    moved.append({p for p, u in flat.items() if bool(jnp.any(u != 0))})
  head, top, bottom = (
    "heads/cls/output/kernel",
    "encoder/layer_3/ffn/output/kernel",
    "encoder/layer_0/ffn/output/kernel",
  )
  # Step 0 is warm-up (lr 0); the head moves from step 1, the top layers from 2, the rest from 4.
  assert head in moved[1] and top not in moved[1] and bottom not in moved[1]
  assert top in moved[2] and bottom not in moved[3]
  assert bottom in moved[4]
  assert any("thaws at step 4" in line for line in summary)


def test_weight_decay_skips_biases_and_norms(params):
  cfg = sgd_config(weight_decay=0.1)
  tx, _ = optim.build(cfg, params, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  flat, p = paths.flatten(updates), paths.flatten(params)
  assert float(jnp.abs(flat["encoder/layer_0/ffn/output/bias"]).max()) == 0.0
  assert float(jnp.abs(flat["encoder/layer_0/output_norm/scale"]).max()) == 0.0
  np.testing.assert_allclose(
    flat["encoder/layer_0/ffn/output/kernel"],
    -0.1 * 0.1 * p["encoder/layer_0/ffn/output/kernel"],
    rtol=1e-5,
  )


def test_frozen_leaves_untouched_by_weight_decay(params):
  cfg = optim.default_config()
  cfg.update(freeze=("encoder/.*",), weight_decay=0.5, lr=1.0)
  tx, _ = optim.build(cfg, params, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  new = params
  for _ in range(3):
    updates, state = tx.update(zeros, state, new)
    new = optax.apply_updates(new, updates)
  for p, x in paths.flatten(new).items():
    if p.startswith("encoder/"):
      np.testing.assert_array_equal(x, paths.flatten(params)[p], err_msg=p)


def test_rsqrt_schedule_warms_up_then_decays_as_the_inverse_square_root():
  """The Transformer schedule (Multi30k baseline): linear warmup to lr, then lr*sqrt(w/step)."""
  cfg = sgd_config(lr=1e-3, schedule="rsqrt", warmup_steps=100)
  sched = optim.lr_schedule(cfg, total_steps=10_000)
  np.testing.assert_allclose(float(sched(50)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-3, rtol=1e-6)  # The peak is optim.lr.
  for step in (400, 2500, 9999):
    np.testing.assert_allclose(float(sched(step)), 1e-3 * np.sqrt(100 / step), rtol=1e-5)
  assert float(sched(10**6)) > 0  # Never decays to zero, unlike linear / cosine.
  with pytest.raises(ValueError, match="needs a warmup"):
    optim.lr_schedule(sgd_config(schedule="rsqrt"), total_steps=100)
  assert float(optim.lr_schedule(cfg, total_steps=1)(0)) == pytest.approx(1e-3)  # Eval only.
  with pytest.raises(ValueError, match="rsqrt"):
    optim.lr_schedule(sgd_config(schedule="noam"), total_steps=100)

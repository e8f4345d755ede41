"""The jitted meta-step and the episode evaluation step, over a batch of episodes.

``meta_step(state, batch) -> (state, metrics)`` has the signature of the ordinary train step
(research.train.steps), so :func:`research.train.parallel.compile_train_step` compiles it the
same way: jit over the mesh, the episode axis of the batch split over devices, the state
donated. The per-episode objective is ``vmap``-ped over the episodes and averaged (or, with
``meta.episode_loop='scan'``, run one episode after the other: the fast weights then exist once,
not once per episode: ~1/E of the memory, and on CPU 0.73x the time of the vmapped second-order
step at research.bench.maml's shape); the outer
optimizer is the run's optax chain (same freeze masks as fine-tuning); the leaves it freezes
(``MetaLearner.frozen``) have their gradient stopped inside the objective, so no meta-gradient is
computed for them. A step whose loss or meta-gradient is not finite is skipped, as in ordinary
training. Under the mesh the episode axis is the batch axis: each device adapts its own
episodes and XLA all-reduces the meta-gradient (tests/test_meta_sharded.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from research import paths
from research.meta.algorithms import MetaLearner
from research.train.state import TrainState
from research.train.steps import apply_if_finite

Batch = dict[str, jax.Array]


def meta_gradient(learner: MetaLearner, params: Any, batch: Batch) -> tuple[Any, dict]:
  """The mean over the batch's episodes of the algorithm's outer gradient, and its metrics.

  MAML/FOMAML/ANIL/ProtoNet differentiate the mean query loss (one gradient tree, not one per
  episode); Reptile averages ``params - adapted`` over the episodes.
  """
  mean = lambda t: jax.tree.map(lambda x: jnp.mean(x, 0), t)
  # Inside the differentiated function, so autodiff never builds the frozen leaves' cotangents.
  query_loss = lambda p, episode: learner.query_loss(stop_frozen(p, learner.frozen), episode)
  if learner.s.algorithm == "reptile":
    per_episode = learner.reptile_direction
  else:

    def per_episode(p, episode):
      (_, aux), grads = jax.value_and_grad(query_loss, has_aux=True)(p, episode)
      return grads, aux

  if learner.s.episode_loop == "scan":  # One episode at a time: shared weights, 1/E memory.

    def body(total, episode):
      grads, aux = per_episode(params, episode)
      return jax.tree.map(jnp.add, total, grads), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, aux = jax.lax.scan(body, zeros, batch)
    episodes = batch["support_labels"].shape[0]
    return jax.tree.map(lambda g: g / episodes, total), mean(aux)
  if learner.s.algorithm == "reptile":
    directions, aux = jax.vmap(per_episode, in_axes=(None, 0))(params, batch)
    return mean(directions), mean(aux)

  def objective(p):
    losses, aux = jax.vmap(query_loss, in_axes=(None, 0))(p, batch)
    return jnp.mean(losses), mean(aux)

  (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
  return grads, aux


def stop_frozen(params: Any, frozen: frozenset[str]) -> Any:
  """``params`` with the gradient of the ``frozen`` paths stopped: autodiff then skips their
  cotangents (they get exact zeros, which the optimizer's freeze mask ignores anyway)."""
  if not frozen:
    return params
  return paths.map_with_path(
    lambda path, x: jax.lax.stop_gradient(x) if path in frozen else x, params
  )


def make_meta_step(
  learner: MetaLearner, axis_name: str | None = None
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The outer step: meta-gradient over the episode batch, then the outer optimizer.

  Args:
    learner: the algorithm on its model.
    axis_name: per-device modes only; gradients and metrics are ``pmean``-ed over it.
  """

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    grads, aux = meta_gradient(learner, state.params, batch)
    if axis_name is not None:
      grads, aux = jax.lax.pmean((grads, aux), axis_name)
    new_state, finite, grad_norm = apply_if_finite(state, grads, aux["loss"])
    streak = new_state.nonfinite_streak
    episodes = batch["support_labels"].shape[0]
    metrics = {
      **aux,
      "loss": jnp.where(finite, aux["loss"], jnp.nan),
      "grad_norm": grad_norm,
      "examples": jnp.asarray(episodes, jnp.float32),
      "nonfinite_streak": streak,
      "nonfinite_total": new_state.nonfinite_total,
    }
    return new_state, metrics

  return step


def make_eval_step(learner: MetaLearner) -> Callable[[Any, Batch], jax.Array]:
  """``eval_step(params, batch) -> [E]`` query accuracy of each episode after adaptation."""

  def step(params: Any, batch: Batch) -> jax.Array:
    if learner.s.episode_loop == "scan":
      return jax.lax.map(lambda episode: learner.evaluate(params, episode), batch)
    return jax.vmap(learner.evaluate, in_axes=(None, 0))(params, batch)

  return step

"""Several tasks in one run: which task each step trains, and each task's batches in that order.

One encoder, one head per task (``params['heads'][task]``); every step trains one task's batch
with that task's jitted step, all steps sharing one TrainState. A single-task run is the case
N = 1 of the same code.

``config.multitask`` (defaults: :func:`default_config`; single-task runs ignore it)::

  sampling      'proportional' (to train-set sizes), 'temperature' (p_i ~ n_i^(1/T)),
                'round_robin' (t0, t1, ..., t0, t1, ...) or 'weights' (p_i ~ weights[task])
  temperature   T of 'temperature' sampling (1 = proportional, large = uniform)
  weights       {task: weight} for sampling='weights'
  loss_weights  {task: w}: that task's loss is multiplied by w (default 1)
  block         the schedule is shuffled within blocks of this many steps

The schedule is stratified rather than drawn i.i.d.: task i's k-th step falls near
``(k + 1/2) / p_i`` (the Webster / Sainte-Laguë apportionment, so every prefix of the schedule
holds each task in its share to about one step), then each block of ``block`` steps is shuffled
with a seeded generator. The mixture is the configured one with no sampling noise (i.i.d. draws
are off by ~sqrt(n p) steps), and the schedule is a pure function of the config and the
train-set sizes: a resumed run recomputes it and needs only each task's iterator position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

SAMPLINGS = ("proportional", "temperature", "round_robin", "weights")


def default_config() -> dict[str, Any]:
  """The ``config.multitask`` fields (see the module docstring)."""
  return dict(sampling="proportional", temperature=2.0, weights={}, loss_weights={}, block=100)


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.multitask`` as a plain dict, its per-task dicts checked against the tasks.

  Raises:
    ValueError: ``weights`` or ``loss_weights`` name a task that is not in ``config.tasks``.
  """
  out = config.multitask.to_dict()
  for key in ("weights", "loss_weights"):
    out[key] = dict(out[key] or {})
    extra = sorted(set(out[key]) - set(config.tasks))
    if extra:
      raise ValueError(f"config.multitask.{key} names {extra}, not in tasks {list(config.tasks)}")
  return out


def task_probs(
  sizes: Mapping[str, int],
  sampling: str = "proportional",
  temperature: float = 2.0,
  weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
  """The share of steps each task gets.

  Args:
    sizes: train-set size (examples) of each task, in task order.
    sampling: one of :data:`SAMPLINGS`.
    temperature: T of 'temperature' sampling, > 0.
    weights: sampling='weights': a non-negative weight for every task.

  Returns:
    ``{task: probability}``, summing to 1.

  Raises:
    ValueError: an unknown sampling, a bad temperature, or weights missing or all zero.
  """
  names = list(sizes)
  n = np.asarray([sizes[t] for t in names], np.float64)
  if sampling == "proportional":
    raw = n
  elif sampling == "temperature":
    if not temperature > 0:
      raise ValueError(f"multitask.temperature={temperature}: must be > 0")
    raw = n ** (1.0 / temperature)
  elif sampling == "round_robin":
    raw = np.ones_like(n)
  elif sampling == "weights":
    missing = [t for t in names if t not in (weights or {})]
    if missing:
      raise ValueError(f"multitask.sampling='weights' needs a weight for {missing}")
    raw = np.asarray([float(weights[t]) for t in names])
  else:
    raise ValueError(f"multitask.sampling={sampling!r}: expected one of {SAMPLINGS}")
  if (raw < 0).any() or raw.sum() <= 0:
    raise ValueError(f"multitask: task shares {dict(zip(names, raw.tolist()))} are not usable")
  return dict(zip(names, (raw / raw.sum()).tolist()))


def schedule(
  probs: Mapping[str, float] | np.ndarray,
  length: int,
  seed: int = 0,
  block: int = 100,
  round_robin: bool = False,
) -> np.ndarray:
  """The task index trained at each step ``0 .. length - 1`` (see module docstring).

  A prefix does not depend on ``length``: extending a run keeps the steps already scheduled.

  Args:
    probs: each task's share (:func:`task_probs`), in task order.
    length: number of steps to schedule.
    seed: shuffles each block.
    block: steps per shuffled block; 1 keeps the apportionment order.
    round_robin: tasks in turn, unshuffled (``probs`` then only gives the task count).
  """
  p = np.asarray(list(probs.values()) if isinstance(probs, Mapping) else probs, np.float64)
  if round_robin:
    return (np.arange(length) % len(p)).astype(np.int32)
  padded = -(-length // block) * block  # Whole blocks, so the last one shuffles like the rest.
  times, ids = [], []
  for i, pi in enumerate(p):
    if pi > 0:
      k = np.arange(int(np.ceil(padded * pi)) + len(p) + 1)  # Past the cut, for any task.
      times.append((k + 0.5) / pi)
      ids.append(np.full(k.shape, i, np.int32))
  times, ids = np.concatenate(times), np.concatenate(ids)
  order = ids[np.lexsort((ids, times))][:padded]  # Ties go to the lower task index.
  if block > 1:
    keys = np.random.default_rng(seed).random(padded).reshape(-1, block)
    perm = np.argsort(keys, axis=1, kind="stable") + np.arange(0, padded, block)[:, None]
    order = order[perm.reshape(-1)]
  return order[:length]


def weighted_tx(tx: optax.GradientTransformation, weight: float) -> optax.GradientTransformation:
  """``tx`` on gradients scaled by ``weight``: the update of ``weight * loss``.

  Same optimizer state as ``tx`` (so all tasks' steps share one TrainState); the step's
  reported loss and gradient norm stay unweighted.
  """

  def update(grads, opt_state, params=None):
    return tx.update(jax.tree.map(lambda g: g * weight, grads), opt_state, params)

  return optax.GradientTransformation(tx.init, update)


class Mixture:
  """The batches of the scheduled task at each step, drawn from one iterator per task.

  Only the scheduled task's iterator is advanced, so prefetching it reads exactly the batches
  training will use. Its position (``get_state``) is the step and every task's iterator
  position, which is what a checkpoint needs to resume on the same trajectory.
  """

  def __init__(self, iterators: Mapping[str, Any], tasks_of_steps: np.ndarray, start_step: int):
    self.iterators, self.names = dict(iterators), list(iterators)
    self._schedule, self.step = tasks_of_steps, start_step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    task = self.names[self._schedule[self.step]]
    batch = next(self.iterators[task])
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "tasks": {t: it.get_state() for t, it in self.iterators.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores :meth:`get_state`'s position; a single-task state of earlier runs (one
    iterator's own position) is accepted for N = 1.

    Raises:
      ValueError: the saved step or tasks do not match this run.
    """
    if "tasks" not in state and len(self.names) == 1:
      state = {"step": self.step, "tasks": {self.names[0]: state}}
    if state["step"] != self.step or set(state["tasks"]) != set(self.names):
      raise ValueError(
        f"input position of step {state['step']} for tasks {sorted(state['tasks'])} does not "
        f"fit this run (step {self.step}, tasks {sorted(self.names)})"
      )
    for task, it in self.iterators.items():
      it.set_state(state["tasks"][task])

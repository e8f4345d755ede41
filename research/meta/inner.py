"""The inner loop of meta-learning: adapt a subset of the parameters to one episode.

The parameters that adapt are chosen by path regexes (research.paths, ``re.fullmatch``), the
same rule syntax as freezing: ``('.*',)`` for MAML, ``('heads/.*',)`` for ANIL. They are split
off as a flat ``{path: leaf}`` dict (the *fast* weights); the rest stay fixed inside the loop.

:func:`sgd_adapt` is the differentiable loop of MAML, FOMAML, ANIL, Reptile and Meta-SGD: a
``lax.scan`` over inner steps of plain SGD, ``jax.checkpoint``-ed per step when asked (the
backward pass then recomputes each step instead of storing its activations). First order stops
the gradient of the inner gradients, so the meta-gradient drops the Hessian terms.
:func:`optax_adapt` is the fine-tuning baseline's loop (any optax optimizer, no meta-gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from research import paths

Flat = dict[str, jax.Array]
LossFn = Callable[[Flat], jax.Array]


def split(params: Any, patterns: Sequence[str]) -> tuple[Flat, Flat]:
  """``(fast, rest)``: flat dicts of the leaves that match ``patterns`` and of the others.

  Raises:
    ValueError: if no parameter matches (an inner loop over nothing is a config mistake).
  """
  flat = paths.flatten(params)
  fast = paths.select(params, list(patterns))
  if not fast:
    raise ValueError(
      f"meta.inner patterns {list(patterns)} match no parameter; paths look like "
      f"{next(iter(flat))!r} ... {next(reversed(flat))!r}"
    )
  rest = {k: v for k, v in flat.items() if k not in fast}
  return fast, rest


def merge(fast: Flat, rest: Flat) -> dict[str, Any]:
  """The nested parameter tree from the two flat halves of :func:`split`."""
  return paths.unflatten({**rest, **fast})


def sgd_adapt(
  loss_fn: LossFn,
  fast: Flat,
  lrs: Flat | float,
  steps: int,
  *,
  first_order: bool = False,
  remat: bool = False,
) -> tuple[Flat, jax.Array]:
  """``steps`` steps of SGD on ``loss_fn`` from ``fast``; differentiable w.r.t. everything.

  Args:
    loss_fn: ``fast -> scalar`` (closes over the fixed parameters and the support set).
    fast: the adapted parameters, a flat ``{path: array}`` dict.
    lrs: one learning rate, or one per leaf (Meta-SGD: arrays shaped like the leaves).
    steps: inner steps (0 returns ``fast`` unchanged).
    first_order: stop the gradient through the inner gradients (FOMAML, Reptile).
    remat: ``jax.checkpoint`` each step (memory for compute in the meta-gradient).

  Returns:
    ``(adapted fast weights, [steps] support losses before each step)``.
  """
  if not isinstance(lrs, dict):
    lrs = {k: lrs for k in fast}

  def step(w: Flat, _):
    loss, grads = jax.value_and_grad(loss_fn)(w)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    w = {k: w[k] - jnp.asarray(lrs[k], w[k].dtype) * grads[k] for k in w}
    return w, loss

  if steps == 0:
    return fast, jnp.zeros([0], jnp.float32)
  if remat:
    step = jax.checkpoint(step)
  return jax.lax.scan(step, fast, None, length=steps)


def optax_adapt(
  loss_fn: LossFn, fast: Flat, tx: optax.GradientTransformation, steps: int
) -> tuple[Flat, jax.Array]:
  """``steps`` steps of ``tx`` on ``loss_fn`` from ``fast`` (fine-tuning; not differentiated).

  Returns:
    ``(adapted weights, [steps] losses before each step)``.
  """

  def step(carry, _):
    w, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(w)
    updates, opt_state = tx.update(grads, opt_state, w)
    return (optax.apply_updates(w, updates), opt_state), loss

  if steps == 0:
    return fast, jnp.zeros([0], jnp.float32)
  (fast, _), losses = jax.lax.scan(step, (fast, tx.init(fast)), None, length=steps)
  return jax.lax.stop_gradient(fast), losses


def inner_lr_tree(params: Any, patterns: Sequence[str], lr: float) -> dict[str, Any]:
  """Meta-SGD's learned learning rates: one array per fast leaf, at ``inner_lr/<its path>``.

  The tree is nested like the parameters (``{'heads': {...}}``) so it sits in the parameter
  tree under ``inner_lr`` and the optimizer's path rules address it like any parameter.
  """
  fast, _ = split(params, patterns)
  return paths.unflatten({k: jnp.full(v.shape, lr, jnp.float32) for k, v in fast.items()})


def fast_lrs(params: Any, fast: Flat, lr: float) -> Flat | float:
  """The inner learning rates: the learned ``inner_lr`` subtree if present, else ``lr``."""
  if "inner_lr" not in params:
    return lr
  learned = paths.flatten(params["inner_lr"])
  missing = [k for k in fast if k not in learned]
  if missing:
    raise ValueError(f"meta_sgd: no learned inner learning rate for {missing[:3]}")
  return {k: learned[k] for k in fast}

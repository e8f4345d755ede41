"""Pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Static things (the model, the task, accumulation) are closed over; only arrays are traced, so
each step is compiled once per batch shape. Gradient accumulation scans over micro-batches and
divides the summed loss by the summed example weight, so k micro-batches of b equal one batch
of k*b. A step whose loss or gradients are not finite is skipped: params and optimizer state
keep their old values and the non-finite counters go up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import optax

from research import paths
from research import tasks as task_lib
from research.models.task_model import TaskModel
from research.train.state import TrainState

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def apply_model(model: TaskModel, params, batch: Batch, task: str, rng=None) -> jax.Array:
  """Logits of one task head; dropout is on exactly when ``rng`` is given."""
  rngs = None if rng is None else {"dropout": rng}
  # Encoder-decoder models name the extra (decoder) inputs they take from the batch.
  extra = {k: batch.get(k) for k in getattr(model, "DECODER_INPUTS", ())}
  if "segment_ids" in batch:  # Packed rows (research.data.packing): per-example fields [B, K].
    extra.update(
      segment_ids=batch["segment_ids"],
      position_ids=batch["position_ids"],
      num_segments=batch["example_mask"].shape[1],
    )
  out = model.apply(
    {"params": params},
    batch["input_ids"],
    batch.get("attention_mask"),
    batch.get("token_type_ids"),
    tasks=(task,),
    deterministic=rng is None,
    rngs=rngs,
    **extra,
  )
  return out[task]


def apply_if_finite(
  state: TrainState, grads: Any, loss: jax.Array, grad_norm: jax.Array | None = None
) -> tuple[TrainState, jax.Array, jax.Array]:
  """One optimizer update, skipped when the loss or the gradient norm is not finite.

  ``grad_norm`` is that of the trained leaves (default: of all of ``grads``). Returns ``(new
  state, finite, grad_norm)``; a skipped step keeps params and optimizer state and raises the
  non-finite counters.
  """
  grad_norm = optax.global_norm(grads) if grad_norm is None else grad_norm
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  return new_state, finite, grad_norm


def make_train_step(
  model: TaskModel,
  task: str,
  kind: str,
  grad_accum: int = 1,
  axis_name: str | None = None,
  loss_options: dict[str, Any] | None = None,
  trainable: Collection[str] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The train step for one task.

  Args:
    model: the TaskModel.
    task: the head to train.
    kind: its task kind (selects the loss in research.tasks).
    grad_accum: micro-batches per step; the batch's leading dim must divide by it.
    axis_name: set when the step runs per device (pmap / shard_map): summed losses, weights
      and gradients are ``psum``-ed over it, so the result equals the global-batch step.
    loss_options: keyword arguments of the task's training loss (e.g. seq2seq
      ``label_smoothing``); evaluation uses the loss's defaults.
    trainable: the paths of the leaves the optimizer trains (``optim.freeze_labels``); only
      they are differentiated, accumulated and all-reduced, and ``grad_norm`` is theirs, so a
      frozen base (LoRA, a QLoRA base's NF4 codes, a frozen encoder) costs no gradient compute
      or memory. None: every floating-point leaf.
  """
  loss_fn = functools.partial(task_lib.get(kind).loss, **dict(loss_options or {}))

  def split(params) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(trained, frozen)`` leaves by path: only the trained ones are differentiated."""
    flat = paths.flatten(params)
    if trainable is None:
      wanted = {p for p, v in flat.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    else:
      wanted = set(trainable)
    train = {p: v for p, v in flat.items() if p in wanted}
    return train, {p: v for p, v in flat.items() if p not in wanted}

  def summed_loss(train, frozen, micro: Batch, rng) -> tuple[jax.Array, jax.Array]:
    logits = apply_model(model, paths.unflatten({**train, **frozen}), micro, task, rng)
    total, weight = loss_fn(logits, micro)
    return total, weight

  value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:  # Per-device modes: each device draws its own dropout masks.
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    train, frozen = split(state.params)
    if grad_accum == 1:
      (total, weight), grads = value_and_grad(train, frozen, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (t, w), g = value_and_grad(train, frozen, mb, jax.random.fold_in(rng, i))
        acc_t, acc_w, acc_g = carry
        return (acc_t + t, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

      zeros = jax.tree.map(jnp.zeros_like, train)
      init = (jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), zeros)
      (total, weight, grads), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
    # Examples (sentences, pairs), not the loss weight (which counts tokens for tagging).
    examples = jnp.sum(batch["example_mask"]).astype(jnp.float32)
    if axis_name is not None:
      total, weight, grads, examples = jax.lax.psum((total, weight, grads, examples), axis_name)
    denom = jnp.maximum(weight, 1.0)
    loss = total / denom
    grads = {p: g / denom for p, g in grads.items()}
    # Frozen leaves get zeros of their own dtype (the optimizer's set_to_zero never reads them).
    full = paths.unflatten({**grads, **{p: jnp.zeros_like(v) for p, v in frozen.items()}})
    new_state, finite, grad_norm = apply_if_finite(state, full, loss, optax.global_norm(grads))
    streak = new_state.nonfinite_streak
    metrics = {
      "loss": jnp.where(finite, loss, jnp.nan),
      "grad_norm": grad_norm,
      "examples": examples,
      "nonfinite_streak": streak,
      "nonfinite_total": new_state.nonfinite_total,
    }
    return new_state, metrics

  return step


def make_eval_step(model: TaskModel, task: str, kind: str) -> Callable[[Any, Batch], Any]:
  """``eval_step(params, batch) -> (predictions, gold, loss sum, weight)`` for one task.

  ``gold`` holds the batch's labels and example mask, returned so that under multi-host every
  process can compute metrics over the global batch.
  """
  module = task_lib.get(kind)

  def step(params, batch: Batch):
    logits = apply_model(model, params, batch, task)
    total, weight = module.loss(logits, batch)
    gold = {k: batch[k] for k in ("labels", "example_mask")}
    return module.predict(logits, batch), gold, total, weight

  return step

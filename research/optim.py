"""Optax chains from config: AdamW/Adafactor/SGD, schedules, clipping, and parameter groups.

Parameter groups are chosen by the path rules of research.paths (``re.fullmatch``, first match
wins) over the ``{'encoder', 'heads', ...}`` tree:

- ``freeze``: these leaves get ``optax.set_to_zero()`` through ``optax.multi_transform``, so they
  carry no optimizer state and stay bitwise identical. It is applied last, outside everything
  else, so neither weight decay nor anything added later can move them. ``trainable`` is the
  complement form used by parameter-efficient transfer (everything else is frozen).
- ``lr_multipliers``: ``(regex, factor)`` rules, e.g. ``(('heads/.*', 10.0),)``.
- ``llrd``: layer-wise LR decay; layer i of L gets ``lr * llrd**(L - i)``, embeddings
  ``lr * llrd**(L + 1)``, heads and pooler ``lr``.
- ``unfreeze``: gradual unfreezing (ULMFiT), ``(regex, step)`` rules; matching leaves receive no
  gradient (so their moments stay zero) and no update before ``step``.
Weight decay skips biases and LayerNorm scales (``no_decay``).
"""

from __future__ import annotations

import collections
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import paths

FROZEN = "frozen"
TRAINABLE = "trainable"


def default_config() -> ml_collections.ConfigDict:
  """The ``config.optim`` fields (placeholders where a tuple of rules is expected)."""
  return ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=5e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      momentum=0.9,
      weight_decay=0.01,
      no_decay=(".*bias", ".*norm/scale"),
      schedule="linear",
      warmup_steps=0,
      warmup_fraction=0.06,
      clip_norm=1.0,
      freeze=(),
      trainable=(),
      lr_multipliers=(),
      llrd=0.0,
      unfreeze=(),
    )
  )


SCHEDULES = ("constant", "linear", "cosine", "rsqrt")


def lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Warmup to ``cfg.lr``, then linear or cosine decay to 0 at ``total_steps``, constant, or
  ``rsqrt``: the Transformer's inverse square root, ``lr * sqrt(warmup / step)`` after the
  warmup (Vaswani et al. 2017 with the peak set by ``lr``), which needs a warmup."""
  configured = cfg.warmup_steps or round(cfg.warmup_fraction * total_steps)
  warmup = min(configured, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  elif cfg.schedule == "rsqrt":
    if configured == 0:
      raise ValueError("optim.schedule='rsqrt' needs a warmup (warmup_steps or warmup_fraction)")
    # join_schedules passes the steps since the warmup ended: lr * sqrt(w / (w + t)).
    w, peak = max(warmup, 1), float(cfg.lr)
    decay = lambda t: peak * jnp.sqrt(w / (w + jnp.asarray(t, jnp.float32)))
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected one of {SCHEDULES}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _check_rules_match(name: str, patterns: list[str], all_paths: list[str]) -> None:
  unused = paths.unused_rules([(p, None) for p in patterns], all_paths)
  if unused:
    raise ValueError(
      f"optim.{name}: pattern(s) {unused} match no parameter; paths look like "
      f"{all_paths[0]!r} ... {all_paths[-1]!r}"
    )


def leaf_multipliers(cfg: ml_collections.ConfigDict, params: Any) -> dict[str, float]:
  """``{path: lr factor}`` from ``lr_multipliers`` rules and LLRD."""
  flat = paths.flatten(params)
  rules = [tuple(r) for r in cfg.lr_multipliers]
  _check_rules_match("lr_multipliers", [r for r, _ in rules], list(flat))
  num_layers = 1 + max((paths.layer_index(p) or 0) for p in flat)
  out = {}
  for path in flat:
    factor = float(paths.match(rules, path, 1.0))
    if cfg.llrd:
      depth = paths.layer_index(path)
      if depth is not None and path.startswith("encoder/"):
        factor *= cfg.llrd ** (num_layers - depth)
      elif path.startswith("encoder/embeddings/"):
        factor *= cfg.llrd ** (num_layers + 1)
    out[path] = factor
  return out


def freeze_labels(cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """A tree of ``'frozen'`` / ``'trainable'`` labels from ``freeze`` and ``trainable``."""
  all_paths = list(paths.flatten(params))
  freeze, trainable = list(cfg.freeze), list(cfg.trainable)
  _check_rules_match("freeze", freeze, all_paths)
  _check_rules_match("trainable", trainable, all_paths)
  rules = [(p, FROZEN) for p in freeze]
  rules += [(p, TRAINABLE) for p in trainable]
  default = FROZEN if trainable else TRAINABLE
  labels = paths.label_tree(params, rules, default=default)
  flat_labels = paths.flatten(labels)
  integer = [
    p
    for p, leaf in paths.flatten(params).items()
    if flat_labels[p] == TRAINABLE and not jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  if integer:  # A QLoRA base's NF4 codes: storage, not something a gradient can move.
    raise ValueError(
      f"optim: integer leaves cannot train, yet {integer[:3]} are trainable; freeze them "
      "(e.g. optim.freeze=('.*kernel_nf4/.*',))"
    )
  if all(label == FROZEN for label in jax.tree.leaves(labels)):
    raise ValueError("optim: every parameter is frozen; nothing would train")
  return labels


class _CountState(NamedTuple):
  count: jax.Array


def _gate_and_scale(factors: dict[str, float], thaw: dict[str, int], gate_only: bool):
  """Per-leaf: zero before the leaf's thaw step; else multiply by its factor (unless gate_only).

  Works on the masked trees that ``multi_transform`` hands its inner transforms by going
  through paths rather than zipping trees.
  """

  def init(_):
    return _CountState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params

    def one(path: str, u):
      scale = 1.0 if gate_only else factors[path]
      if thaw.get(path, 0) > 0:
        return jnp.where(state.count >= thaw[path], u * scale, jnp.zeros_like(u))
      return u * scale if scale != 1.0 else u

    return paths.map_with_path(one, updates), _CountState(state.count + 1)

  return optax.GradientTransformation(init, update)


def _base_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  if cfg.name == "adamw":
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.name == "adafactor":
    return optax.scale_by_factored_rms()
  if cfg.name == "sgd":
    return optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity()
  raise ValueError(f"optim.name={cfg.name!r}: expected adamw, adafactor or sgd")


def build(
  cfg: ml_collections.ConfigDict, params: Any, total_steps: int
) -> tuple[optax.GradientTransformation, list[str]]:
  """The optimizer for ``params`` and a one-line-per-group summary.

  Args:
    cfg: ``config.optim`` (see :func:`default_config`).
    params: the parameter tree (shapes are enough: ShapeDtypeStructs work).
    total_steps: length of the schedule.

  Returns:
    ``(tx, summary_lines)``.

  Raises:
    ValueError: an unknown optimizer or schedule, a rule matching no parameter, or
      everything frozen.
  """
  labels = freeze_labels(cfg, params)
  factors = leaf_multipliers(cfg, params)
  unfreeze = [tuple(r) for r in cfg.unfreeze]
  _check_rules_match("unfreeze", [r for r, _ in unfreeze], list(factors))
  thaw = {p: int(paths.match(unfreeze, p, 0)) for p in factors}
  no_decay = [(p, False) for p in cfg.no_decay]
  decay_mask = lambda tree: paths.label_tree(tree, no_decay, default=True)
  schedule = lr_schedule(cfg, total_steps)
  gated = any(thaw.values())
  train = optax.chain(
    _gate_and_scale(factors, thaw, gate_only=True) if gated else optax.identity(),
    optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
    _base_optimizer(cfg),
    optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)
    if cfg.weight_decay
    else optax.identity(),
    optax.scale_by_learning_rate(schedule),
    _gate_and_scale(factors, thaw, gate_only=False),
  )
  # Freezing goes last and outermost: frozen leaves see only set_to_zero (no state, no decay).
  tx = optax.multi_transform({TRAINABLE: train, FROZEN: optax.set_to_zero()}, labels)
  return tx, summarize(params, labels, factors, thaw, cfg.lr)


def summarize(params, labels, factors, thaw, lr) -> list[str]:
  """One line per group of leaves sharing (trainable, lr factor, thaw step)."""
  groups: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
  flat_labels = paths.flatten(labels)
  for path, leaf in paths.flatten(params).items():
    frozen = flat_labels[path] == FROZEN
    key = (frozen, 0.0 if frozen else factors[path], 0 if frozen else thaw[path])
    groups[key][0] += 1
    groups[key][1] += math.prod(np.shape(leaf))
  lines = []
  for (frozen, factor, step), (leaves, count) in sorted(groups.items(), key=lambda kv: kv[0]):
    what = "frozen" if frozen else f"lr={lr * factor:.3g}"
    thawing = f", thaws at step {step}" if step else ""
    lines.append(f"group {what}{thawing}: {leaves} leaves, {count:,} params")
  total = sum(c for _, c in groups.values())
  trainable = sum(c for (frozen, *_), (_, c) in groups.items() if not frozen)
  lines.append(f"params: {total:,} total, {trainable:,} trainable")
  return lines


def count_params(params: Any, labels: Any | None = None) -> dict[str, int]:
  """``{'total': n, 'trainable': m}``; trainable counts leaves not labelled frozen."""
  flat = paths.flatten(params)
  total = sum(math.prod(np.shape(x)) for x in flat.values())
  if labels is None:
    return {"total": total, "trainable": total}
  fl = paths.flatten(labels)
  trainable = sum(math.prod(np.shape(x)) for p, x in flat.items() if fl[p] != FROZEN)
  return {"total": total, "trainable": trainable}

"""The inner loop of meta-learning: adapt a subset of the parameters to one episode.

The parameters that adapt are chosen by path regexes (research.paths, ``re.fullmatch``), the
same rule syntax as freezing: ``('.*',)`` for MAML, ``('heads/.*',)`` for ANIL. They are split
off as a flat ``{path: leaf}`` dict (the *fast* weights); the rest stay fixed inside the loop.

:func:`sgd_adapt` is the differentiable loop of MAML, FOMAML, ANIL, Reptile and Meta-SGD: a
``lax.scan`` over inner steps of plain SGD, ``jax.checkpoint``-ed per step when asked (the
backward pass then recomputes each step instead of storing its activations). First order stops
the gradient of the inner gradients, so the meta-gradient drops the Hessian terms.

The second-order term can be differentiated two ways (``hvp``): ``'reverse'`` lets autodiff
differentiate the scanned inner gradients (reverse-over-reverse: every step's forward and
backward activations are stored for the meta-gradient); ``'forward'`` gives each inner step a
custom VJP that recomputes the step and takes its Hessian-vector products forward-over-reverse
(``jax.jvp`` of ``jax.grad``), storing only the weights per step. Both are exact.
:func:`proximal_adapt` is iMAML's loop (Rajeswaran et al. 2019): SGD on the support loss plus
``lam/2 |phi - theta|^2``, never differentiated through; its custom VJP is the implicit gradient
of the proximal solution, ``(I + H/lam)^-1 v`` by conjugate gradient, so the meta-gradient's
memory does not grow with the inner steps.
:func:`optax_adapt` is the fine-tuning baseline's loop (any optax optimizer, no meta-gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
  hvp: str = "reverse",
) -> tuple[Flat, jax.Array]:
  """``steps`` steps of SGD on ``loss_fn`` from ``fast``; differentiable w.r.t. everything.

  Args:
    loss_fn: ``fast -> scalar`` (closes over the fixed parameters and the support set).
    fast: the adapted parameters, a flat ``{path: array}`` dict.
    lrs: one learning rate, or one per leaf (Meta-SGD: arrays shaped like the leaves).
    steps: inner steps (0 returns ``fast`` unchanged).
    first_order: stop the gradient through the inner gradients (FOMAML, Reptile).
    remat: ``jax.checkpoint`` each step (memory for compute in the meta-gradient).
    hvp: ``'reverse'`` or ``'forward'``: how the second-order term is differentiated (module
      docstring); ``'forward'`` recomputes each step anyway, so ``remat`` is moot there.

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
  if hvp not in ("reverse", "forward"):
    raise ValueError(f"meta.hvp={hvp!r}: expected 'reverse' or 'forward'")
  if hvp == "forward" and not first_order:
    converted, floats, ints = _hoist_closure(loss_fn, fast)
    lr_tree = {k: jnp.asarray(lrs[k], w.dtype) for k, w in fast.items()}

    def step(w: Flat, _):
      return _sgd_step(converted, w, lr_tree, floats, ints)

  elif remat:
    step = jax.checkpoint(step)
  return jax.lax.scan(step, fast, None, length=steps)


def _hoist_closure(loss_fn: LossFn, fast: Flat) -> tuple[Callable, tuple, tuple]:
  """``(f, floats, ints)`` with ``f(w, floats, ints) == loss_fn(w)``: every array ``loss_fn``
  closes over (fixed parameters, ANIL's features, the episode's token ids) made an argument, as
  a custom VJP needs (``jax.closure_convert`` hoists only the differentiated ones)."""
  closed = jax.make_jaxpr(loss_fn)(fast)
  consts = list(closed.consts)
  is_float = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]
  floats = tuple(c for c, f in zip(consts, is_float) if f)
  ints = tuple(c for c, f in zip(consts, is_float) if not f)

  def converted(w: Flat, floats: tuple, ints: tuple) -> jax.Array:
    fi, ii = iter(floats), iter(ints)
    values = [next(fi) if f else next(ii) for f in is_float]
    return jax.core.eval_jaxpr(closed.jaxpr, values, *jax.tree.leaves(w))[0]

  return converted, floats, ints


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sgd_step(loss_fn: Callable, w: Flat, lrs: Flat, floats: tuple, ints: tuple):
  """``w - lrs * grad loss_fn(w, ...)`` and the loss; VJP by forward-over-reverse HVPs."""
  loss, grads = jax.value_and_grad(loss_fn)(w, floats, ints)
  return {k: w[k] - lrs[k] * grads[k] for k in w}, loss


def _sgd_step_fwd(loss_fn, *args):
  # symbolic_zeros: the arguments arrive wrapped (with whether each is perturbed).
  w, lrs, floats, ints = jax.tree.map(
    lambda a: a.value, args, is_leaf=lambda a: isinstance(a, jax.custom_derivatives.CustomVJPPrimal)
  )
  return _sgd_step(loss_fn, w, lrs, floats, ints), (w, lrs, floats, ints)


def _sgd_step_bwd(loss_fn, residuals, cotangents):
  """With ``u = lrs * v`` (``v`` the cotangent of the new weights) and ``H`` the Hessian of the
  loss in ``(w, floats)``: ``w`` gets ``v - H_ww u``, ``floats`` get ``-H_fw u`` (symmetry of
  second derivatives makes both one JVP of the gradient along ``u``), ``lrs`` get ``-g * v``;
  a cotangent on the returned loss (usually a symbolic zero) adds its gradient."""
  w, lrs, floats, ints = residuals
  v, loss_ct = cotangents
  v = {k: _instantiate(v[k], w[k]) for k in w}
  grad_fn = jax.grad(lambda w, c: loss_fn(w, c, ints), argnums=(0, 1))
  u = {k: lrs[k] * v[k] for k in w}
  zeros = jax.tree.map(jnp.zeros_like, floats)
  (g_w, g_c), (h_w, h_c) = jax.jvp(grad_fn, (w, floats), (u, zeros))
  w_ct = {k: v[k] - h_w[k] for k in w}
  floats_ct = tuple(-h for h in h_c)
  if not isinstance(loss_ct, jax.custom_derivatives.SymbolicZero):
    w_ct = {k: w_ct[k] + loss_ct * g_w[k] for k in w}
    floats_ct = tuple(ct + loss_ct * g for ct, g in zip(floats_ct, g_c))
  lrs_ct = {k: _sum_to(-g_w[k] * v[k], lrs[k].shape) for k in w}
  ints_ct = tuple(np.zeros(jnp.shape(i), jax.dtypes.float0) for i in ints)
  return w_ct, lrs_ct, floats_ct, ints_ct


def _instantiate(ct: Any, like: jax.Array) -> jax.Array:
  """A cotangent that may be a symbolic zero, as an array."""
  return jnp.zeros_like(like) if isinstance(ct, jax.custom_derivatives.SymbolicZero) else ct


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``x`` summed down to ``shape`` (a scalar or same-shaped learning rate)."""
  return x if x.shape == tuple(shape) else jnp.sum(x).reshape(shape)


_sgd_step.defvjp(_sgd_step_fwd, _sgd_step_bwd, symbolic_zeros=True)


def proximal_adapt(
  loss_fn: LossFn, fast: Flat, lr: float, steps: int, *, lam: float, cg_steps: int
) -> tuple[Flat, jax.Array]:
  """iMAML's inner loop: ``steps`` SGD steps on ``loss_fn(phi) + lam/2 |phi - fast|^2`` from
  ``fast``, with the implicit meta-gradient as its VJP.

  The loop is not differentiated (no activations of any step are kept); the backward pass
  treats the result as the exact minimiser ``phi*`` of the proximal objective and returns
  ``g = (I + H/lam)^-1 v`` for ``fast`` (``v``: the cotangent of ``phi``, usually the query
  loss gradient; ``H``: the Hessian of ``loss_fn`` at ``phi``), solved by ``cg_steps`` steps of
  conjugate gradient from ``g = v`` (0 steps: the first-order approximation), with
  Hessian-vector products by ``jax.jvp`` of ``jax.grad``. Everything ``loss_fn`` closes over
  that is differentiated (parameters kept fixed in the loop, a prototype head's features) gets
  ``-H_cp g / lam``, the implicit function theorem's other term. The gradient is exact only as
  far as the loop converged: ``steps`` and ``lr`` should bring the proximal objective (strongly
  convex for a large enough ``lam``) close to its minimum.

  Args:
    loss_fn: ``fast -> scalar`` (the support loss; closes over the fixed parameters).
    fast: the adapted parameters' starting point ``theta``, a flat ``{path: array}`` dict.
    lr: the inner SGD learning rate.
    steps: inner steps (0 returns ``fast``, whose gradient is then ``(I + H/lam)^-1 v``).
    lam: the proximal strength (> 0).
    cg_steps: conjugate-gradient iterations of the backward solve.

  Returns:
    ``(phi, [steps] support losses before each step)``; the losses carry no gradient.

  Raises:
    ValueError: ``lam <= 0`` or negative ``steps`` / ``cg_steps``.
  """
  if lam <= 0 or steps < 0 or cg_steps < 0:
    raise ValueError(
      f"iMAML needs lam > 0 and steps, cg_steps >= 0; got {lam}, {steps}, {cg_steps}"
    )
  converted, floats, ints = _hoist_closure(loss_fn, fast)
  opts = (float(lr), int(steps), float(lam), int(cg_steps))
  phi, losses = _proximal(converted, opts, fast, floats, ints)
  return phi, jax.lax.stop_gradient(losses)


def _proximal_loop(loss_fn: Callable, opts: tuple, theta: Flat, floats: tuple, ints: tuple):
  lr, steps, lam, _ = opts

  def step(w: Flat, _):
    loss, grads = jax.value_and_grad(loss_fn)(w, floats, ints)
    cast = lambda x, k: jnp.asarray(x, w[k].dtype)
    w = {k: w[k] - cast(lr, k) * (grads[k] + cast(lam, k) * (w[k] - theta[k])) for k in w}
    return w, loss

  if steps == 0:
    return theta, jnp.zeros([0], jnp.float32)
  return jax.lax.scan(step, theta, None, length=steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _proximal(loss_fn: Callable, opts: tuple, theta: Flat, floats: tuple, ints: tuple):
  """``(phi, losses)`` of the proximal loop; VJP: the implicit gradient (proximal_adapt)."""
  return _proximal_loop(loss_fn, opts, theta, floats, ints)


def _proximal_fwd(loss_fn, opts, theta, floats, ints):
  phi, losses = _proximal_loop(loss_fn, opts, theta, floats, ints)
  return (phi, losses), (phi, floats, ints)


def _proximal_bwd(loss_fn, opts, residuals, cotangents):
  """``theta`` gets ``g = (I + H_pp/lam)^-1 v``; ``floats`` get ``-H_cp g / lam`` (from
  ``grad_p L(phi*, c) + lam (phi* - theta) = 0``); the losses' cotangent is ignored (the
  public function stops their gradient)."""
  phi, floats, ints = residuals
  v, _ = cotangents
  lam, cg_steps = opts[2], opts[3]
  grad_w = jax.grad(lambda w: loss_fn(w, floats, ints))

  def matvec(x: Flat) -> Flat:  # (I + H/lam) x, H at phi over the fast weights only.
    hx = jax.jvp(grad_w, (phi,), (x,))[1]
    return {k: x[k] + hx[k] / jnp.asarray(lam, x[k].dtype) for k in x}

  g = conjugate_gradient(matvec, v, cg_steps)
  grad_both = jax.grad(lambda w, c: loss_fn(w, c, ints), argnums=(0, 1))
  zeros = jax.tree.map(jnp.zeros_like, floats)
  _, (_, h_c) = jax.jvp(grad_both, (phi, floats), (g, zeros))
  floats_ct = tuple(-h / jnp.asarray(lam, h.dtype) for h in h_c)
  ints_ct = tuple(np.zeros(jnp.shape(i), jax.dtypes.float0) for i in ints)
  return g, floats_ct, ints_ct


_proximal.defvjp(_proximal_fwd, _proximal_bwd)


def conjugate_gradient(matvec: Callable[[Flat], Flat], b: Flat, iters: int) -> Flat:
  """``iters`` steps of conjugate gradient on ``matvec(x) = b`` (symmetric positive definite),
  from ``x = b``: iMAML's ``I + H/lam`` is close to the identity, so ``b`` is already a good
  guess. A fixed count (no tolerance test) keeps the solve one static loop under ``vmap``."""
  dot = lambda a, c: sum(jnp.vdot(a[k], c[k]).astype(jnp.float32) for k in a)
  ax = matvec(b)
  r = {k: b[k] - ax[k] for k in b}
  rs = dot(r, r)

  def body(carry, _):
    x, r, p, rs = carry
    ap = matvec(p)
    pap = dot(p, ap)
    alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
    x = {k: x[k] + alpha.astype(x[k].dtype) * p[k] for k in x}
    r = {k: r[k] - alpha.astype(r[k].dtype) * ap[k] for k in r}
    rs_new = dot(r, r)
    beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
    p = {k: r[k] + beta.astype(r[k].dtype) * p[k] for k in r}
    return (x, r, p, rs_new), None

  if iters == 0:
    return b
  (x, *_), _ = jax.lax.scan(body, (b, r, r, rs), None, length=iters)
  return x


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

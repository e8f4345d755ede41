"""iMAML (``meta.algorithm='imaml'``): the implicit meta-gradient against dense and unrolled maths.

The proximal inner loop is run to convergence, so the implicit function theorem holds; the
conjugate-gradient meta-gradient of :func:`research.meta.inner.proximal_adapt` is then checked
against ``(I + H/lam)^-1 grad L_q`` solved densely with ``jax.hessian`` (on a quadratic-like
problem and on the tiny TaskModel), against MAML's gradient through many unrolled steps of the
same proximal objective, and against central differences that re-solve the inner problem.
``pytest -k imaml``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_meta_algorithms import jit, learner, make_episode, make_model, plain_loss

from research.meta import inner
from research.meta.algorithms import Settings
from research.models.task_model import init_params

LAM, LR, STEPS = 2.0, 0.1, 400
MODEL_LAM = 10.0


def problem(seed: int = 0, dim: int = 6):
  """A smooth, strongly convex support loss with a differentiated closure ``c`` and a
  non-quadratic query loss."""
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((dim, dim))
  a = jnp.asarray(m @ m.T / dim + np.eye(dim), jnp.float32)
  d = jnp.asarray(rng.standard_normal(dim), jnp.float32)

  def support(x, c):
    return 0.5 * (x - c) @ a @ (x - c) + 0.1 * jnp.sum(jnp.sin(x))

  def query(x):
    return jnp.sum(jnp.log(jnp.cosh(x - d))) + 0.5 * jnp.sum(x**3) / dim

  theta = jnp.asarray(rng.standard_normal(dim), jnp.float32)
  c = jnp.asarray(rng.standard_normal(dim), jnp.float32)
  return support, query, theta, c


def imaml_objective(support, query, cg_steps: int, steps: int = STEPS):
  def objective(theta, c):
    phi, _ = inner.proximal_adapt(
      lambda w: support(w["x"], c), {"x": theta}, LR, steps, lam=LAM, cg_steps=cg_steps
    )
    return query(phi["x"])

  return objective


def test_imaml_conjugate_gradient_solves_spd_system():
  rng = np.random.default_rng(0)
  m = rng.standard_normal((7, 7))
  a = jnp.asarray(m @ m.T + 0.5 * np.eye(7), jnp.float32)
  b = {"x": jnp.asarray(rng.standard_normal(7), jnp.float32)}
  x = inner.conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, 7)
  np.testing.assert_allclose(x["x"], jnp.linalg.solve(a, b["x"]), rtol=1e-4, atol=1e-4)
  assert inner.conjugate_gradient(lambda v: v, b, 0) is b  # 0 steps: the first-order guess.


def test_imaml_gradient_equals_dense_implicit_gradient_and_unrolled_maml():
  support, query, theta, c = problem()
  got_theta, got_c = jax.jit(jax.grad(imaml_objective(support, query, 6), argnums=(0, 1)))(theta, c)
  # The exact implicit gradient at the converged phi*, by dense linear algebra.
  phi, _ = inner.proximal_adapt(
    lambda w: support(w["x"], c), {"x": theta}, LR, STEPS, lam=LAM, cg_steps=0
  )
  phi = phi["x"]
  prox_grad = jax.grad(support)(phi, c) + LAM * (phi - theta)
  assert float(jnp.max(jnp.abs(prox_grad))) < 1e-5, "the inner loop should have converged"
  h = jax.hessian(support)(phi, c)
  h_xc = jax.jacobian(jax.grad(support), argnums=1)(phi, c)  # d/dc of grad_x: [x, c]
  g = jnp.linalg.solve(jnp.eye(len(phi)) + h / LAM, jax.grad(query)(phi))
  np.testing.assert_allclose(got_theta, g, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_c, -h_xc.T @ g / LAM, rtol=1e-4, atol=1e-5)

  # MAML through many exact (unrolled, second-order) steps of the same proximal objective.
  def maml(theta, c):
    prox = lambda w: support(w["x"], c) + 0.5 * LAM * jnp.sum((w["x"] - theta) ** 2)
    phi, _ = inner.sgd_adapt(prox, {"x": theta}, LR, STEPS)
    return query(phi["x"])

  unrolled = jax.jit(jax.grad(maml, argnums=(0, 1)))(theta, c)
  np.testing.assert_allclose(got_theta, unrolled[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_c, unrolled[1], rtol=1e-4, atol=1e-5)
  # Few CG steps approximate it; none is the first-order gradient grad L_q(phi*).
  fo = jax.grad(imaml_objective(support, query, 0))(theta, c)
  np.testing.assert_allclose(fo, jax.grad(query)(phi), rtol=1e-6)
  assert float(jnp.max(jnp.abs(fo - g))) > 1e-2


def test_imaml_gradient_matches_finite_differences_of_resolved_inner_problem():
  support, query, theta, c = problem(1)
  objective = imaml_objective(support, query, 6)
  got = jax.jit(jax.grad(objective, argnums=(0, 1)))(theta, c)
  f = jax.jit(objective)
  rng = np.random.default_rng(2)
  eps = 1e-2
  for _ in range(3):
    dt = jnp.asarray(rng.standard_normal(theta.shape), jnp.float32)
    dc = jnp.asarray(rng.standard_normal(c.shape), jnp.float32)
    fd = (f(theta + eps * dt, c + eps * dc) - f(theta - eps * dt, c - eps * dc)) / (2 * eps)
    analytic = float(jnp.vdot(got[0], dt) + jnp.vdot(got[1], dc))
    assert abs(float(fd) - analytic) < 2e-3 * max(abs(analytic), 1.0), (float(fd), analytic)


def test_imaml_meta_sgd_and_bad_lambda_are_refused():
  lrn = learner(make_model(), algorithm="imaml")
  fields = {f: getattr(lrn.s, f) for f in lrn.s.__dataclass_fields__}
  with pytest.raises(ValueError, match="imaml"):
    Settings(**{**fields, "meta_sgd": True})
  with pytest.raises(ValueError, match="lam > 0"):
    inner.proximal_adapt(
      lambda w: jnp.sum(w["x"] ** 2), {"x": jnp.ones(2)}, 0.1, 1, lam=0.0, cg_steps=1
    )


@pytest.fixture(scope="module")
def tiny_model():
  model = make_model()
  params = jit(lambda r: init_params(model, r, 6))(jax.random.key(0))
  return model, params, make_episode(0)


def model_learner(model, steps: int = 200, **kw):
  """At this init the support loss's Hessian has eigenvalues in about [-5, 5]: lam = 10 makes
  the proximal objective strongly convex (the loop converges) and ``I + H/lam`` far enough
  from the identity that the solve matters."""
  return learner(
    model,
    algorithm="imaml",
    inner_steps=steps,
    inner_lr=0.05,
    imaml={"lam": MODEL_LAM, "cg_steps": 30},
    **kw,
  )


def test_imaml_tiny_model_meta_gradient_equals_dense_implicit_gradient(tiny_model):
  """Every parameter adapts (MAML's inner set); the dense system is over all of them."""
  model, params, ep = tiny_model
  lrn = model_learner(model)
  got = jit(jax.grad(lambda p: lrn.query_loss(p, ep)[0]))(params)
  adapted, _ = jit(lambda p: lrn.adapt(p, ep, lrn.s.inner_steps))(params)
  flat_phi, unravel = ravel_pytree(adapted)
  ls = lambda v: plain_loss(model, unravel(v), ep, "support_")
  lq = lambda v: plain_loss(model, unravel(v), ep, "query_")
  flat_theta, _ = ravel_pytree(params)
  residual = jax.grad(ls)(flat_phi) + MODEL_LAM * (flat_phi - flat_theta)
  assert float(jnp.max(jnp.abs(residual))) < 1e-5, "the inner loop should have converged"
  h = jit(jax.hessian(ls))(flat_phi)
  want = jnp.linalg.solve(jnp.eye(len(flat_phi)) + h / MODEL_LAM, jax.grad(lq)(flat_phi))
  got_flat, _ = ravel_pytree(got)
  scale = float(jnp.max(jnp.abs(want)))
  assert float(jnp.max(jnp.abs(got_flat - want))) < 1e-4 * max(scale, 1.0)
  first_order = jax.grad(lq)(flat_phi)
  assert float(jnp.max(jnp.abs(first_order - want))) > 1e-2 * scale  # The solve matters.


def test_imaml_tiny_model_finite_differences(tiny_model):
  """Perturb theta, re-run the proximal loop to convergence, difference the query loss."""
  model, params, ep = tiny_model
  lrn = model_learner(model)
  got = jit(jax.grad(lambda p: lrn.query_loss(p, ep)[0]))(params)
  objective = jit(lambda p: lrn.query_loss(p, ep)[0])
  rng = np.random.default_rng(1)
  eps = 1e-2
  for _ in range(3):
    d = jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape) * (float(jnp.std(x)) + 0.05), x.dtype),
      params,
    )
    plus = jax.tree.map(lambda x, y: x + eps * y, params, d)
    minus = jax.tree.map(lambda x, y: x - eps * y, params, d)
    fd = (objective(plus) - objective(minus)) / (2 * eps)
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(d)))
    assert abs(float(fd) - analytic) < 2e-2 * max(abs(analytic), 1e-3), (float(fd), analytic)


def test_imaml_proto_head_and_anil_inner_set_differentiate_the_encoder(tiny_model):
  """With a head-only inner set the encoder is a closed-over parameter: its meta-gradient is
  ``-H_cp g / lam`` plus its direct term; a prototype head adds the path through its init."""
  model, params, ep = tiny_model
  for kw in (dict(inner=("heads/.*",)), dict(head_init="proto")):
    lrn = model_learner(model, 50, **kw)
    g = jit(jax.grad(lambda p, lrn=lrn: lrn.query_loss(p, ep)[0]))(params)
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g["encoder"]))))
    assert np.isfinite(norm) and norm > 0, kw

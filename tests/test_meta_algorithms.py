"""Meta-learning maths on a tiny TaskModel (``pytest -k maml``, ``-k anil``, ``-k reptile``).

The second-order MAML meta-gradient is checked against a hand-written two-step unrolled
reference (the chain rule written out with Hessian-vector products) and against central finite
differences; FOMAML against the same reference with the Hessian terms dropped; ANIL's
features-once fast path against a naively unrolled head-only loop; Reptile against its closed
form on a quadratic and, for one inner step, on the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import paths
from research.meta import inner
from research.meta.algorithms import (
  MetaLearner,
  cross_entropy,
  default_config,
  settings_from_config,
)
from research.meta.steps import make_eval_step, make_meta_step, meta_gradient
from research.models.config import EncoderConfig
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.train.state import TrainState

# The programs here are tiny but deep (gradients of scanned gradients): LLVM's optimisations
# cost most of their compile time and none of their (exact) results.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
N, K, Q, T = 3, 2, 2, 6
LR = 0.3
ENC = EncoderConfig.tiny(
  vocab_size=16,
  hidden_size=8,
  num_layers=1,
  num_heads=2,
  intermediate_size=16,
  max_position_embeddings=8,
  hidden_dropout=0.0,
  attention_dropout=0.0,
)
TASK = "intents"


def make_model():
  return make_task_model(ENC, {TASK: HeadConfig(num_labels=N, pooling="mean", dropout=0.0)})


def make_episode(seed: int = 0, n: int = N, k: int = K, q: int = Q) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ep = {}
  for prefix, m in (("support_", n * k), ("query_", n * q)):
    lengths = rng.integers(3, T + 1, m)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ep[f"{prefix}input_ids"] = (rng.integers(1, ENC.vocab_size, (m, T)) * mask).astype(np.int32)
    ep[f"{prefix}attention_mask"] = mask
    ep[f"{prefix}token_type_ids"] = np.zeros((m, T), np.int32)
  ep["support_labels"] = np.repeat(np.arange(n, dtype=np.int32), k)
  ep["query_labels"] = np.repeat(np.arange(n, dtype=np.int32), q)
  ep["classes"] = np.arange(n, dtype=np.int32)
  return ep


def test_task_model_parts_compute_the_full_model():
  """MetaLearner runs TaskModel.encoder_module / head_module on subtrees of the same params."""
  model = make_model()
  params = init_params(model, jax.random.key(0), T)
  ep = make_episode()
  ids, mask = ep["query_input_ids"], ep["query_attention_mask"]
  full = model.apply({"params": params}, ids, mask)[TASK]
  feats = model.encoder_module().apply({"params": params["encoder"]}, ids, mask)
  logits = model.head_module(TASK).apply({"params": params["heads"][TASK]}, feats, mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=1e-6, atol=1e-6)
  with pytest.raises(KeyError, match="unknown task"):
    model.head_module("nope")


@pytest.fixture(scope="module")
def setup():
  model = make_model()
  params = jit(lambda r: init_params(model, r, T))(jax.random.key(0))
  # Larger head weights than BERT's init so the second-order terms are not negligible.
  head = params["heads"][TASK]["output"]
  head["kernel"] = head["kernel"] * 25.0
  return model, params, make_episode(0)


def plain_loss(model, params, ep, prefix: str) -> jax.Array:
  """The episode loss written directly with TaskModel.apply (independent of MetaLearner)."""
  logits = model.apply({"params": params}, ep[f"{prefix}input_ids"], ep[f"{prefix}attention_mask"])[
    TASK
  ]
  return cross_entropy(logits, ep[f"{prefix}labels"])


def tree_axpy(a, x, y):
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def hvp(f, params, v):
  return jax.jvp(jax.grad(f), (params,), (v,))[1]


def reference_maml(model, params, ep, first_order: bool):
  """Two inner SGD steps written out; the meta-gradient by the chain rule:

  g = (I - a H(t1)) (I - a H(t0)) grad Lq(t2), with H the support-loss Hessian.
  """
  ls = lambda p: plain_loss(model, p, ep, "support_")
  lq = lambda p: plain_loss(model, p, ep, "query_")
  t0 = params
  t1 = tree_axpy(-LR, jax.grad(ls)(t0), t0)
  t2 = tree_axpy(-LR, jax.grad(ls)(t1), t1)
  v = jax.grad(lq)(t2)
  if first_order:
    return v
  v = tree_axpy(-LR, hvp(ls, t1, v), v)
  return tree_axpy(-LR, hvp(ls, t0, v), v)


def learner(model, **kw):
  """A MetaLearner on ``config.meta``'s defaults with ``kw`` (Settings' field names) over them."""
  cfg = ml_collections.ConfigDict(default_config())
  cfg.update(algorithm="maml", inner_steps=2, inner_lr=LR, head_init="learned")
  for key, value in kw.items():
    if key == "finetune_steps":
      cfg.finetune.steps = value
    else:
      cfg[{"remat": "remat_inner"}.get(key, key)] = value
  return MetaLearner(model, TASK, settings_from_config(cfg))


def max_rel(a, b) -> float:
  fa, fb = paths.flatten(a), paths.flatten(b)
  scale = max(float(jnp.max(jnp.abs(x))) for x in fb.values())
  return max(float(jnp.max(jnp.abs(fa[k] - fb[k]))) for k in fb) / scale


def meta_grad(lrn, params, ep):
  return jit(jax.grad(lambda p, e: lrn.query_loss(p, e)[0]))(params, ep)


def test_maml_second_order_equals_unrolled_reference_and_finite_differences(setup):
  model, params, ep = setup
  lrn = learner(model)
  got = meta_grad(lrn, params, ep)
  reference = jit(reference_maml, static_argnums=(0, 3))
  ref = reference(model, params, ep, False)
  assert max_rel(got, ref) < 1e-4
  fo = reference(model, params, ep, True)
  assert max_rel(fo, ref) > 1e-2, "the second-order term should matter in this test"
  # Central differences of the meta-objective along random directions.
  objective = jit(lambda p: lrn.query_loss(p, ep)[0]).lower(params).compile()
  rng = np.random.default_rng(1)
  for _ in range(3):
    # Directions scaled like each leaf, so a step of eps is a small relative change.
    d = jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape) * (float(jnp.std(x)) + 0.05), x.dtype),
      params,
    )
    eps = 1e-2
    fd = (objective(tree_axpy(eps, d, params)) - objective(tree_axpy(-eps, d, params))) / (2 * eps)
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(d)))
    assert abs(float(fd) - analytic) < 2e-2 * max(abs(analytic), 1e-3), (float(fd), analytic)


def test_fomaml_equals_reference_with_second_order_term_stopped(setup):
  model, params, ep = setup
  got = meta_grad(learner(model, algorithm="fomaml", first_order=True), params, ep)
  ref = jit(reference_maml, static_argnums=(0, 3))(model, params, ep, True)
  assert max_rel(got, ref) < 1e-4


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(algorithm="anil", inner=("heads/.*",)),
    dict(head_init="proto"),
    dict(meta_sgd=True),
  ],
  ids=["maml", "anil", "proto_maml", "meta_sgd"],
)
def test_maml_forward_over_reverse_hvp_same_meta_gradient(setup, kw):
  """``meta.hvp='forward'`` (custom-VJP inner steps, HVPs by jvp of grad) is the same gradient,
  including the parts that flow through the fixed parameters (ANIL's encoder), the episode's
  prototype head and Meta-SGD's learned inner learning rates."""
  model, params, ep = setup
  if kw.get("meta_sgd"):
    params = {**params, "inner_lr": inner.inner_lr_tree(params, (".*",), LR)}
  reverse = meta_grad(learner(model, **kw), params, ep)
  forward = meta_grad(learner(model, hvp="forward", **kw), params, ep)
  assert max_rel(forward, reverse) < 1e-5
  if not kw:
    ref = jit(reference_maml, static_argnums=(0, 3))(model, params, ep, False)
    assert max_rel(forward, ref) < 1e-4
  if kw.get("meta_sgd"):
    assert float(optax.global_norm(forward["inner_lr"])) > 0


def test_maml_forward_hvp_differentiates_the_support_losses():
  """The support losses sgd_adapt returns carry their gradient too (a loss on them)."""
  rng = np.random.default_rng(0)
  m = rng.standard_normal((3, 3))
  a = jnp.asarray(m @ m.T / 3 + np.eye(3))
  c = jnp.asarray(rng.standard_normal(3))

  def objective(theta, hvp):
    loss = lambda w: 0.5 * (w["x"] - c) @ a @ (w["x"] - c) + jnp.sum(jnp.sin(w["x"]))
    w, losses = inner.sgd_adapt(loss, {"x": theta}, 0.1, 3, hvp=hvp)
    return jnp.sum(w["x"] ** 2) + jnp.sum(losses)

  theta = jnp.asarray(rng.standard_normal(3))
  want = jax.grad(objective)(theta, "reverse")
  np.testing.assert_allclose(jax.grad(objective)(theta, "forward"), want, rtol=1e-5)


@pytest.mark.slow
def test_maml_remat_inner_steps_same_gradient(setup):
  model, params, ep = setup
  a = meta_grad(learner(model), params, ep)
  b = meta_grad(learner(model, remat=True), params, ep)
  assert max_rel(a, b) < 1e-5


def test_anil_adapts_only_the_head_and_matches_naive_unroll(setup):
  model, params, ep = setup
  lrn = learner(model, algorithm="anil", inner=("heads/.*",))
  assert lrn.s.head_only
  adapted, _ = jit(lambda p: lrn.adapt(p, ep, 2))(params)
  fa, fp = paths.flatten(adapted), paths.flatten(params)
  for k in fp:
    changed = not np.array_equal(np.asarray(fa[k]), np.asarray(fp[k]))
    assert changed == k.startswith("heads/"), k

  def naive(p):  # Full forward every inner step, head leaves only updated.
    ls = lambda q: plain_loss(model, q, ep, "support_")
    for _ in range(2):
      g = jax.grad(ls)(p)
      heads = jax.tree.map(lambda w, gw: w - LR * gw, p["heads"], g["heads"])
      p = {**p, "heads": heads}
    return plain_loss(model, p, ep, "query_")

  got = meta_grad(lrn, params, ep)
  ref = jit(jax.grad(naive))(params)
  assert max_rel(got, ref) < 1e-4
  enc_norm = optax.global_norm(got["encoder"])
  assert float(enc_norm) > 0  # The encoder is meta-learned through the head's adaptation.


@pytest.mark.slow
def test_maml_meta_sgd_learned_inner_lrs(setup):
  model, params, ep = setup
  lrn = learner(model, meta_sgd=True)
  with_lr = {**params, "inner_lr": inner.inner_lr_tree(params, (".*",), LR)}
  l1 = lrn.query_loss(with_lr, ep)[0]
  l0 = learner(model).query_loss(params, ep)[0]
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  grads = meta_grad(lrn, with_lr, ep)
  leaf = "heads/intents/output/bias"
  g = paths.flatten(grads["inner_lr"])[leaf]
  objective = lambda lrs: lrn.query_loss({**params, "inner_lr": lrs}, ep)[0]
  for i in range(N):
    flat = paths.flatten(with_lr["inner_lr"])
    e = 1e-2
    hi = {**flat, leaf: flat[leaf].at[i].add(e)}
    lo = {**flat, leaf: flat[leaf].at[i].add(-e)}
    fd = (objective(paths.unflatten(hi)) - objective(paths.unflatten(lo))) / (2 * e)
    np.testing.assert_allclose(float(fd), float(g[i]), rtol=3e-2, atol=1e-4)


def test_reptile_sgd_adapt_closed_form_on_quadratic():
  rng = np.random.default_rng(0)
  m = rng.standard_normal((4, 4))
  a = jnp.asarray(m @ m.T / 4 + np.eye(4))
  c, theta = jnp.asarray(rng.standard_normal(4)), jnp.asarray(rng.standard_normal(4))
  alpha, k, eps = 0.1, 5, 0.5
  loss = lambda w: 0.5 * (w["x"] - c) @ a @ (w["x"] - c)
  phi, _ = inner.sgd_adapt(loss, {"x": theta}, alpha, k, first_order=True)
  closed = c + jnp.linalg.matrix_power(jnp.eye(4) - alpha * a, k) @ (theta - c)
  np.testing.assert_allclose(phi["x"], closed, rtol=1e-5, atol=1e-6)
  # The outer step: SGD with lr eps on (theta - phi) is Reptile's theta + eps (phi - theta).
  tx = optax.sgd(eps)
  updates, _ = tx.update({"x": theta - phi["x"]}, tx.init({"x": theta}))
  new = optax.apply_updates({"x": theta}, updates)["x"]
  np.testing.assert_allclose(new, theta + eps * (closed - theta), rtol=1e-5, atol=1e-6)


def test_reptile_meta_step_one_inner_step_closed_form(setup):
  """k=1: Reptile's update is eps * alpha * mean over episodes of grad L(support+query)."""
  model, params, _ = setup
  eps = 0.5
  lrn = learner(model, algorithm="reptile", inner_steps=1, first_order=True)
  eps_list = [make_episode(s) for s in (3, 4)]
  batch = {k: np.stack([e[k] for e in eps_list]) for k in eps_list[0]}
  state = TrainState.create(params, optax.sgd(eps), jax.random.key_data(jax.random.key(0)))
  new, metrics = jit(make_meta_step(lrn))(state, batch)
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))

  def joint_loss(p, e):
    cat = lambda k: jnp.concatenate([e[f"support_{k}"], e[f"query_{k}"]])
    logits = model.apply({"params": p}, cat("input_ids"), cat("attention_mask"))[TASK]
    return cross_entropy(logits, cat("labels"))

  grad = jit(jax.grad(joint_loss))
  grads = [grad(params, e) for e in eps_list]
  mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
  expected = tree_axpy(-eps * LR, mean, params)
  assert max_rel(new.params, expected) < 1e-5


@pytest.mark.slow
def test_maml_meta_gradient_averages_episodes(setup):
  model, params, _ = setup
  lrn = learner(model)
  eps_list = [make_episode(s) for s in (5, 6)]
  batch = {k: np.stack([e[k] for e in eps_list]) for k in eps_list[0]}
  got, aux = jit(lambda p: meta_gradient(lrn, p, batch))(params)
  grad = jit(jax.grad(lambda p, e: lrn.query_loss(p, e)[0]))
  each = [grad(params, e) for e in eps_list]
  assert max_rel(got, jax.tree.map(lambda a, b: (a + b) / 2, *each)) < 1e-5
  assert set(aux) >= {"loss", "accuracy"}


@pytest.mark.parametrize(
  "algorithm,hvp", [("maml", "reverse"), ("maml", "forward"), ("reptile", "reverse")]
)
def test_maml_episode_loop_scan_equals_vmap(setup, algorithm, hvp):
  """``meta.episode_loop='scan'`` (episodes in turn, 1/E memory) is the same meta-gradient."""
  model, params, _ = setup
  eps_list = [make_episode(s) for s in (5, 6)]
  batch = {k: np.stack([e[k] for e in eps_list]) for k in eps_list[0]}
  got = {
    loop: jit(
      lambda p, b, loop=loop: meta_gradient(
        learner(model, algorithm=algorithm, episode_loop=loop, hvp=hvp), p, b
      )
    )(params, batch)
    for loop in ("vmap", "scan")
  }
  assert max_rel(got["scan"][0], got["vmap"][0]) < 1e-5
  np.testing.assert_allclose(got["scan"][1]["loss"], got["vmap"][1]["loss"], rtol=1e-6)
  if algorithm == "maml":
    accs = {
      loop: jit(make_eval_step(learner(model, episode_loop=loop)))(params, batch)
      for loop in ("vmap", "scan")
    }
    np.testing.assert_array_equal(accs["scan"], accs["vmap"])


@pytest.mark.slow
@pytest.mark.parametrize("head_init", ["zeros", "proto"])
def test_maml_head_init_and_baselines_evaluate(setup, head_init):
  model, params, ep = setup
  for algorithm in ("maml", "protonet", "finetune"):
    lrn = learner(model, algorithm=algorithm, head_init=head_init, finetune_steps=3)
    acc = jit(lrn.evaluate)(params, ep)
    assert 0.0 <= float(acc) <= 1.0
  # Zero head: the stored head gets no meta-gradient (it is reset every episode).
  g = meta_grad(learner(model, head_init=head_init), params, ep)
  assert float(optax.global_norm(g["heads"])) == 0.0
  if head_init == "proto":  # Before adaptation, Proto-MAML's head is the ProtoNet classifier.
    lrn = learner(model, head_init="proto")
    p = lrn.episode_head(
      params,
      lrn.encode(params, ep, "support_"),
      ep["support_attention_mask"],
      ep["support_labels"],
      N,
    )
    a = lrn._query_logits(p, ep)
    b = learner(model, algorithm="protonet").protonet_logits(params, ep)
    # Equal up to a per-row constant (|q|^2).
    np.testing.assert_allclose(
      a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True), rtol=1e-4, atol=1e-4
    )

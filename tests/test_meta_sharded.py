"""Sharded meta-batches: the episodes of a meta-batch split over the mesh's data axis.

The meta trainer compiles its meta-step like the ordinary train step
(:func:`research.train.parallel.compile_train_step`): the batch's leading (episode) axis carries
``NamedSharding(mesh, P(('data', 'fsdp')))``, the params are replicated, and XLA's partitioner
runs each device's episodes where they are and all-reduces the meta-gradient. These tests pin
that this is the same computation as on one device: the meta-gradient and one meta-step's
params on the 8 fake CPU devices of tests/conftest.py against one device, and the meta-gradient
of two processes joined by ``jax.distributed.initialize`` on 127.0.0.1 (4 devices each, each
feeding its own half of the episodes) against one process. ``pytest -k sharded``.

This file doubles as the two-process worker: ``python tests/test_meta_sharded.py ID PORT OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from test_meta_algorithms import TASK, jit, learner, make_episode, make_model

from research import paths
from research.meta.steps import make_meta_step, meta_gradient
from research.models.task_model import init_params
from research.train import parallel
from research.train.state import TrainState

EPISODES = 8
HERE = Path(__file__).resolve().parent


def problem(head_scale: float = 25.0):
  """The tiny model and 8 episodes; MAML's head is scaled so the second-order terms matter,
  iMAML's is not (``I + H/lam`` must stay positive definite for conjugate gradient)."""
  model = make_model()
  params = jit(lambda r: init_params(model, r, 6))(jax.random.key(0))
  head = params["heads"][TASK]["output"]
  head["kernel"] = head["kernel"] * head_scale
  eps = [make_episode(s) for s in range(10, 10 + EPISODES)]
  batch = {k: np.stack([e[k] for e in eps]) for k in eps[0]}
  return model, jax.device_get(params), batch


def gradient_fn(lrn, mesh):
  rep = parallel.replicated(mesh)
  return jit(
    lambda p, b: meta_gradient(lrn, p, b)[0],
    in_shardings=(rep, parallel.batch_sharding(mesh)),
    out_shardings=rep,
  )


def assert_trees_close(a, b, rtol: float = 1e-5) -> None:
  """Leaf-wise agreement to ``rtol`` of the tree's largest entry (absolute floor 1e-7)."""
  fa, fb = paths.flatten(a), paths.flatten(b)
  assert fa.keys() == fb.keys()
  scale = max(float(np.max(np.abs(np.asarray(x)))) for x in fb.values())
  for k in fb:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=max(rtol * scale, 1e-7), err_msg=k)


def sharded_learner(model, algorithm: str):
  """One inner step (a smaller program to compile); iMAML well conditioned (lam 10)."""
  if algorithm == "imaml":
    return learner(
      model, algorithm="imaml", inner_steps=3, inner_lr=0.05, imaml={"lam": 10.0, "cg_steps": 5}
    )
  return learner(model, algorithm=algorithm, inner_steps=1)


@pytest.mark.parametrize("algorithm", ["maml", pytest.param("imaml", marks=pytest.mark.slow)])
def test_meta_sharded_meta_gradient_and_step_equal_one_device(algorithm):
  assert jax.device_count() == 8, "tests/conftest.py gives 8 fake CPU devices"
  model, params, batch = problem(1.0 if algorithm == "imaml" else 25.0)
  lrn = sharded_learner(model, algorithm)
  one = parallel.make_mesh(devices=jax.devices()[:1])
  grads = gradient_fn(lrn, one)(params, batch)
  assert float(optax.global_norm(grads)) > 0

  # One meta-step of the trainer's compiled step on the 8 devices (state donated): outer SGD,
  # whose update is linear in the meta-gradient, against that update of the one-device one.
  mesh = parallel.make_mesh()
  tx = optax.sgd(0.1)
  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(0)))
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  step = parallel.compile_train_step(
    lambda axis: make_meta_step(lrn, axis), "jit", mesh, shardings, parallel.batch_sharding(mesh)
  )
  new, metrics = step(jax.device_put(state, shardings), batch)
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
  want = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.device_get(grads))
  assert_trees_close(jax.device_get(new.params), want)
  sharded = gradient_fn(lrn, mesh)(params, batch)
  assert_trees_close(jax.device_get(sharded), jax.device_get(grads))


def worker(process_id: int, port: int, out: str) -> None:
  """One of two processes: its 4 devices join a global 8-device mesh, it feeds its own half
  of the episodes, and process 0 saves the (replicated) meta-gradient."""
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  model, params, batch = problem()
  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  half = EPISODES // 2
  local = {k: v[process_id * half : (process_id + 1) * half] for k, v in batch.items()}
  global_batch = parallel.global_batch(local, parallel.batch_sharding(mesh))
  params = jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, x), params)
  grads = gradient_fn(learner(model), mesh)(params, global_batch)
  if process_id == 0:
    flat = {k: np.asarray(v.addressable_data(0)) for k, v in paths.flatten(grads).items()}
    np.savez(out, **flat)


@pytest.mark.slow  # Two processes start and compile a second-order meta-gradient.
def test_meta_sharded_two_processes_same_meta_gradient(tmp_path):
  from test_distributed import free_port

  port, out = free_port(), tmp_path / "grads.npz"
  env = dict(os.environ)
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"
  )
  procs = [
    subprocess.Popen(
      [sys.executable, str(Path(__file__)), str(i), str(port), str(out)],
      cwd=HERE,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("two-process meta-gradient timed out")
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  model, params, batch = problem()
  want = gradient_fn(learner(model), parallel.make_mesh(devices=jax.devices()[:1]))(params, batch)
  got = dict(np.load(out))
  assert_trees_close(paths.unflatten(got), jax.device_get(want))


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

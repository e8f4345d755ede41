"""Checks that need a GPU (``pytest -m gpu``; research/bench/gpu_check.sh runs them there with
``JAX_PLATFORMS=cuda,cpu``): the default compute dtype there, and the GPU's fp32 numbers against
the CPU's. Skipped on a machine without one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import train

from research import paths
from research.models.config import EncoderConfig
from research.models.encoder import Encoder
from research.train.state import compute_dtype

pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


def test_gpu_auto_dtype_is_bf16_with_fp32_master_weights_tracking_cpu_fp32():
  assert compute_dtype("auto") == jnp.bfloat16
  losses, state = train("jit", devices=1, steps=5, dtype="auto")
  reference, _ = train("jit", devices=1, steps=5, dtype="float32", platform="cpu")
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
  assert losses.dtype == np.float32 and np.all(np.isfinite(losses))
  np.testing.assert_allclose(losses, reference, rtol=2e-2)


def test_gpu_fp32_training_matches_cpu():
  """Same loss curve and params on the GPU as on the CPU at full fp32 matmul precision."""
  with jax.default_matmul_precision("highest"):
    losses, state = train("jit", devices=1, steps=5, dtype="float32")
    reference, ref_state = train("jit", devices=1, steps=5, dtype="float32", platform="cpu")
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  ref, got = paths.flatten(jax.device_get(ref_state.params)), paths.flatten(state.params)
  for path, value in ref.items():
    np.testing.assert_allclose(np.asarray(got[path]), value, rtol=1e-4, atol=1e-6, err_msg=path)


def test_gpu_encoder_forward_matches_cpu():
  cfg = EncoderConfig(
    vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128
  )
  model = Encoder(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 512, (4, 24)).astype(np.int32)
  mask = (np.arange(24)[None] < np.array([[24], [20], [9], [1]])).astype(np.int32)
  cpu = jax.devices("cpu")[0]
  params = jax.device_put(model.init(jax.random.key(0), ids, mask), cpu)
  with jax.default_matmul_precision("highest"):
    on_gpu = jax.jit(model.apply)(jax.device_put(params, jax.devices()[0]), ids, mask)
    on_cpu = jax.jit(model.apply)(params, jax.device_put(ids, cpu), jax.device_put(mask, cpu))
  out_gpu = np.asarray(jax.tree.leaves(on_gpu)[0])
  out_cpu = np.asarray(jax.tree.leaves(on_cpu)[0])
  np.testing.assert_allclose(out_gpu, out_cpu, rtol=1e-5, atol=1e-5)

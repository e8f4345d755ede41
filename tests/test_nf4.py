"""NF4 storage for QLoRA's frozen base: bitsandbytes' code book, nearest-value quantisation,
double-quantised absmaxes and the dequantising matmul (test names carry ``nf4``)."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import peft_layers as pl


def reference_nf4_code(offset: float = 0.9677083) -> np.ndarray:
  """The QLoRA paper's ``create_normal_map``: 8 positive and 7 negative N(0, 1) quantiles of
  evenly spaced probabilities (fp32, as torch.linspace gives them), a zero, scaled to [-1, 1]."""
  ppf = statistics.NormalDist().inv_cdf
  positive = [ppf(float(p)) for p in np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1]]
  negative = [-ppf(float(p)) for p in np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1]]
  values = np.sort(np.asarray([*positive, 0.0, *negative], np.float32))
  return values / values.max()


def test_nf4_code_book_equals_the_reference_construction():
  np.testing.assert_allclose(pl.NF4_CODE, reference_nf4_code(), rtol=0, atol=1e-6)
  code8 = pl.dynamic_code()
  # bitsandbytes' signed dynamic map: 1.0 appended, the most negative a bucket mean.
  assert code8.shape == (256,) and code8[-1] == 1.0 and code8[0] == np.float32(-0.99296875)
  smallest = np.min(np.abs(code8[code8 != 0]))  # 1e-6 x the mean of [0.1, 1].
  assert smallest == pytest.approx(5.5e-7, rel=1e-6)
  assert np.all(np.diff(code8) >= 0) and 0.0 in code8


def test_nf4_quantise_picks_the_nearest_code_and_bounds_the_error():
  rng = np.random.default_rng(0)
  w = rng.normal(0, 0.02, (256, 96)).astype(np.float32)  # 384 blocks: two absmax groups.
  q = pl.nf4_quantize(w)
  assert q["codes"].dtype == np.uint8 and q["codes"].size == w.size // 2
  assert q["absmax"].size == w.size // 64 and q["scale"].size == 2
  blocks = w.reshape(-1, 64)
  absmax = np.abs(blocks).max(axis=1)
  brute = np.argmin(np.abs(blocks[..., None] / absmax[:, None, None] - pl.NF4_CODE), axis=-1)
  idx = np.stack([q["codes"] >> 4, q["codes"] & 15], axis=-1).reshape(-1, 64)
  assert np.mean(idx == brute) > 0.999  # Ties at a midpoint may go either way.

  back = np.asarray(jax.jit(pl.nf4_dequantize, static_argnums=1)(q, w.shape))
  got_absmax = np.abs(back.reshape(-1, 64)).max(axis=1)
  # Double quantisation: absmaxes within 1% of their true value...
  assert np.max(np.abs(got_absmax - absmax) / absmax) < 0.01
  # ...and each weight within half the widest code gap of its block's scale.
  half_gap = np.max(np.diff(pl.NF4_CODE)) / 2
  bound = (half_gap * absmax * 1.01)[:, None]
  assert np.all(np.abs(back.reshape(-1, 64) - blocks) <= bound + 1e-7)
  rel = np.sqrt(np.mean((back - w) ** 2) / np.mean(w**2))
  print(f"nf4 relative rmse {rel:.4f}")
  assert rel < 0.12
  bits = 8 * sum(np.asarray(v).nbytes for v in q.values()) / w.size
  assert bits < 4.2, bits  # ~4.127 bits a weight against bf16's 16.


def test_nf4_matmul_equals_the_dequantised_product_and_refuses_odd_sizes():
  rng = np.random.default_rng(1)
  w = rng.normal(0, 0.05, (64, 32)).astype(np.float32)
  x = jnp.asarray(rng.normal(0, 1, (3, 64)), jnp.float32)
  q = {k: jnp.asarray(v) for k, v in pl.nf4_quantize(w).items()}
  got = jax.jit(pl.nf4_matmul, static_argnums=2)(x, q, w.shape)
  np.testing.assert_allclose(got, x @ pl.nf4_dequantize(q, w.shape), rtol=1e-6, atol=1e-6)
  exact = x @ w
  assert float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)) < 0.15
  with pytest.raises(ValueError, match="not a multiple of the block 64"):
    pl.nf4_quantize(np.zeros((3, 5), np.float32))


def test_nf4_traced_quantise_equals_the_host_one_and_codes_keep_the_shape():
  """The jnp path (a model's jitted init) gives the numpy path's bytes; a kernel's codes are
  ``[in, out/2]`` so a stored kernel still tells its shape (:func:`nf4_shape`)."""
  rng = np.random.default_rng(2)
  w = rng.normal(0, 0.02, (96, 48)).astype(np.float32)
  host = pl.nf4_quantize(w)
  traced = jax.jit(lambda v: pl.nf4_quantize(v, xp=jnp))(w)
  assert host["codes"].shape == (96, 24) and pl.nf4_shape(host) == w.shape
  for key, value in host.items():
    assert traced[key].dtype == value.dtype and traced[key].shape == np.shape(value), key
    np.testing.assert_array_equal(np.asarray(traced[key]), value, err_msg=key)
  odd = pl.nf4_quantize(np.zeros((64, 3), np.float32))  # An odd last axis: flat codes.
  assert odd["codes"].shape == (96,)

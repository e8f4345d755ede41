"""The dense-stack benchmark's three sides compute the same gradients (else its timings compare
different work), and its CLI ends with the ratio line."""

import jax
import numpy as np
import pytest

from research.bench import dense_stack

torch = pytest.importorskip("torch")


def _weights(layers=2, hidden=8, intermediate=16):
  key = jax.random.PRNGKey(1)
  shapes = dense_stack.block_shapes(hidden, intermediate)
  return [
    [0.1 * jax.random.normal(jax.random.fold_in(key, 10 * i + j), s) for j, s in enumerate(shapes)]
    for i in range(layers)
  ]


def test_layouts_and_torch_give_the_same_gradients():
  weights = _weights()
  x = jax.random.normal(jax.random.PRNGKey(2), (12, 8))
  with jax.default_matmul_precision("highest"):
    gw_tok, gx_tok = jax.grad(dense_stack.token_major, argnums=(0, 1))(weights, x)
    gw_feat, gx_feat = jax.grad(dense_stack.feature_major, argnums=(0, 1))(weights, x.T)
  tw = [[torch.tensor(np.asarray(w), requires_grad=True) for w in b] for b in weights]
  tx = torch.tensor(np.asarray(x), requires_grad=True)
  dense_stack.torch_loss(tw, tx).backward()
  np.testing.assert_allclose(gx_feat.T, gx_tok, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tx.grad.numpy(), gx_tok, rtol=1e-5, atol=1e-6)
  for block_tok, block_feat, block_torch in zip(gw_tok, gw_feat, tw):
    for g_tok, g_feat, w in zip(block_tok, block_feat, block_torch):
      np.testing.assert_allclose(g_feat, g_tok, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(w.grad.numpy(), g_tok, rtol=1e-5, atol=1e-6)


def test_cli_prints_the_ratio_last(capsys):
  args = ["--batch=2", "--seq=4", "--layers=1", "--hidden=8", "--intermediate=16"]
  assert dense_stack.main([*args, "--rounds=1", "--steps=1"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("torch_over_xla=") and float(last.split("=")[1]) > 0

"""research.models.common.attention (jax.nn.dot_product_attention) against a written-out reference.

Every model's attention goes through that one function, so it is checked here against
``softmax(q k^T * scale + bias, masked) v`` computed in float64 numpy, on the cases the models
use: key padding (the encoders), a relative position bias (MPNet), causal + padding with
grouped keys/values (the decoder-only families), cross-attention (the seq2seq decoder) and a
single decoding query. The model parity tests (test_hf_transfer, test_mpnet, test_causal_lm,
test_seq2seq, test_decode) check the same function against transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import common


def reference(q, k, v, mask=None, bias=None, scale=None):
  """softmax(q k^T * scale + bias) v in float64, masked logits dropped; grouped heads repeated."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  n, h = q.shape[2:]
  groups = n // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scale = 1 / np.sqrt(h) if scale is None else scale
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64).reshape((1,) * (4 - np.ndim(bias)) + bias.shape)
  if mask is not None:
    mask = np.broadcast_to(
      np.asarray(mask, bool).reshape((1,) * (4 - np.ndim(mask)) + mask.shape), logits.shape
    )
    logits = np.where(mask, logits, -np.inf)
    # A row with nothing to attend to gets uniform weights (what the function promises).
    empty = ~mask.any(-1, keepdims=True)
    logits = np.where(empty, 0.0, logits)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, v)


def inputs(b, t, s, n, kv, h, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, s, kv, h)).astype(np.float32)
  v = rng.normal(size=(b, s, kv, h)).astype(np.float32)
  return q, k, v


def padding(b, s, lengths):
  return np.arange(s)[None, :] < np.asarray(lengths)[:, None]  # [B, S]


def causal_padding(b, t, lengths):
  causal = np.tril(np.ones((t, t), bool))
  return causal[None, None] & padding(b, t, lengths)[:, None, None, :]  # [B, 1, T, T]


CASES = {
  # name: (b, t, s, n, kv, h, mask builder, bias shape)
  "key_padding": (3, 7, 7, 4, 4, 8, lambda: padding(3, 7, [7, 4, 1])[:, None, None, :], None),
  "relative_bias": (2, 6, 6, 4, 4, 8, lambda: padding(2, 6, [6, 3])[:, None, None, :], (4, 6, 6)),
  "gqa_causal_padding": (2, 5, 5, 8, 2, 16, lambda: causal_padding(2, 5, [5, 2]), None),
  "gqa_bias_and_mask": (2, 5, 5, 6, 3, 8, lambda: causal_padding(2, 5, [5, 3]), (1, 6, 5, 5)),
  "cross_attention": (2, 4, 9, 4, 4, 8, lambda: padding(2, 9, [9, 5])[:, None, None, :], None),
  "one_query_gqa": (2, 1, 9, 4, 1, 8, lambda: padding(2, 9, [9, 6])[:, None, None, :], None),
  "no_mask": (1, 5, 5, 2, 2, 4, lambda: None, None),
}


@pytest.mark.parametrize("path", ["dpa", "written_out", "heads_major"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_equals_dot_product_attention_reference(case, path):
  """fp32, to 1e-5: through jax.nn.dot_product_attention, through the written-out path that
  attention dropout takes (identity dropout here), and over heads-major keys/values (a decoding
  cache's layout)."""
  b, t, s, n, kv, h, make_mask, bias_shape = CASES[case]
  q, k, v = inputs(b, t, s, n, kv, h)
  mask = make_mask()
  bias = None
  if bias_shape is not None:
    bias = np.random.default_rng(1).normal(size=bias_shape).astype(np.float32)
  scale = 0.3 if case == "no_mask" else None
  drop = (lambda w: w) if path == "written_out" else None
  major = path == "heads_major"
  out = jax.jit(
    lambda q, k, v, mask, bias: common.attention(
      q, k, v, mask=mask, bias=bias, scale=scale, weights_dropout=drop, heads_major=major
    )
  )(q, *((k.swapaxes(1, 2), v.swapaxes(1, 2)) if major else (k, v)), mask, bias)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, bias, scale), atol=1e-5)


@pytest.mark.parametrize("case", ["self", "gqa_bias"])
def test_attention_over_beam_rows_equals_reordered_cache(case):
  """Beam search's cache is never reordered: with ``beam_rows``, each beam reads its positions
  from the rows that hold them. The same as gathering each beam's keys/values into its own row
  first (what reordering the cache kept), to 1e-5, with a causal mask and a position bias."""
  groups, beams, s, index = 3, 4, 7, 5
  n, kv = (4, 4) if case == "self" else (6, 2)
  q, k, v = inputs(groups * beams, 1, s, n, kv, 8)
  rng = np.random.default_rng(2)
  rows = rng.integers(0, beams, size=(groups, beams, s)).astype(np.int32)
  rows[:, :, index] = np.arange(beams)  # The step's own position, in its own row.
  mask = (np.arange(s) <= index)[None, None, None, :]  # [1, 1, 1, S]
  bias = rng.normal(size=(1, n, 1, s)).astype(np.float32) if case == "gqa_bias" else None
  # Reference: every beam's keys/values gathered from the rows holding them.
  source = np.repeat(np.arange(groups), beams)[:, None] * beams  # [B, 1]
  take = source + rows.reshape(groups * beams, s)  # [B, S]: the row of each position.
  positions = np.arange(s)[None, :]
  own_k, own_v = k[take, positions], v[take, positions]  # [B, S, K, H]
  expected = reference(q, own_k, own_v, mask, bias)
  out = jax.jit(
    lambda q, k, v, rows, mask, bias: common.attention(
      q, k, v, mask=mask, bias=bias, heads_major=True, beam_rows=rows
    )
  )(q, k.swapaxes(1, 2), v.swapaxes(1, 2), rows, mask, bias)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
  # Rows not holding a beam's positions are never read: changing them changes nothing.
  other = k.copy()
  unused = np.ones(k.shape[:2], bool)
  unused[take, positions] = False
  other[unused] = 100.0
  again = common.attention(
    q,
    other.swapaxes(1, 2),
    v.swapaxes(1, 2),
    mask=mask,
    bias=bias,
    heads_major=True,
    beam_rows=rows,
  )
  np.testing.assert_allclose(np.asarray(again), np.asarray(out), atol=1e-6)


def test_dot_product_attention_fully_masked_rows_stay_finite():
  """A padded query with no key to see (left padding in a causal LM) gets finite output."""
  q, k, v = inputs(1, 4, 4, 2, 2, 8)
  mask = np.zeros((1, 1, 4, 4), bool)
  mask[..., 2:, 2:] = np.tril(np.ones((2, 2), bool))
  out = np.asarray(common.attention(q, k, v, mask=mask))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, reference(q, k, v, mask), atol=1e-5)


def test_dot_product_attention_bf16_keeps_fp32_softmax():
  """bf16 inputs: the result is bf16 and as close to the fp32 reference as bf16 inputs allow
  (logits accumulated and softmaxed in fp32)."""
  q, k, v = inputs(2, 16, 16, 4, 2, 32)
  mask = causal_padding(2, 16, [16, 9])
  cast = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = common.attention(cast(q), cast(k), cast(v), mask=mask)
  assert out.dtype == jnp.bfloat16
  rounded = [np.asarray(cast(x), np.float32) for x in (q, k, v)]
  np.testing.assert_allclose(
    np.asarray(out, np.float32), reference(*rounded, mask), atol=3e-2, rtol=3e-2
  )


def test_dot_product_attention_implementation_choice(monkeypatch):
  """On CPU 'auto' is XLA's; the environment variable overrides; a bad name is refused."""
  monkeypatch.delenv(common.ATTENTION_ENV, raising=False)
  assert common.attention_implementation() == "auto"
  monkeypatch.setenv(common.ATTENTION_ENV, "XLA")
  assert common.attention_implementation() == "xla"
  assert common.attention_implementation("cudnn") == "cudnn"
  monkeypatch.setenv(common.ATTENTION_ENV, "flash")
  with pytest.raises(ValueError, match="RESEARCH_ATTENTION"):
    common.attention_implementation()
  monkeypatch.delenv(common.ATTENTION_ENV)
  q, k, _ = (jnp.asarray(x, jnp.bfloat16) for x in inputs(1, 4, 4, 2, 2, 8))
  assert not common._cudnn_fits(q, k)  # No GPU here: cuDNN is never picked on its own.


def test_dot_product_attention_cudnn_bias_folds_mask_and_stays_finite(monkeypatch):
  """The cuDNN path's inputs, checked without a GPU: jax.nn.dot_product_attention is replaced by
  its XLA kernel, which is handed what cuDNN would get: one bf16 bias over the whole [T, S],
  the mask folded in, finite even where an fp32 bias held finfo.min."""
  original = jax.nn.dot_product_attention
  seen = {}

  def as_xla(q, k, v, bias=None, mask=None, *, scale=None, implementation=None):
    assert implementation == "cudnn" and mask is None
    seen["bias"] = bias
    return original(q, k, v, bias=bias, scale=scale, implementation="xla")

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  q, k, v = inputs(2, 6, 6, 4, 2, 8)
  mask = causal_padding(2, 6, [6, 3])
  mask[1, :, 0] = False  # A query with nothing to see.
  bias = np.random.default_rng(2).normal(size=(1, 4, 6, 6)).astype(np.float32)
  bias[..., 0, 5] = np.finfo(np.float32).min  # A bias that already masks.
  cast = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = common.attention(cast(q), cast(k), cast(v), mask=mask, bias=bias, implementation="cudnn")
  assert seen["bias"].dtype == jnp.bfloat16 and seen["bias"].shape == (2, 4, 6, 6)
  assert np.isfinite(np.asarray(seen["bias"], np.float32)).all()
  rounded = [np.asarray(cast(x), np.float32) for x in (q, k, v)]
  full = mask & (bias > -1e30)
  expected = reference(*rounded, full, np.where(bias > -1e30, bias, 0.0).astype(np.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)

"""A linear-chain CRF over word positions: log-likelihood (forward algorithm) and Viterbi.

Tagging batches label a word at its first sub-token (``-100`` elsewhere), so the CRF runs over
the compacted sequence of first sub-tokens: :func:`compact` moves the labelled positions of
each row to the front, keeping their order, and returns their mask. Both recursions are
``lax.scan``s over positions with the mask freezing finished rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def compact(emissions: Array, keep: Array) -> tuple[Array, Array, Array]:
  """``(emissions [B,W,K], mask [B,W], order [B,W])`` with kept positions moved to the front."""
  order = jnp.argsort(~keep, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order[..., None] if x.ndim == 3 else order, axis=1)
  return take(emissions), take(keep), order


def log_likelihood(
  emissions: Array, tags: Array, mask: Array, transitions: Array, start: Array, end: Array
) -> Array:
  """Per-row ``log p(tags | emissions)``; rows of ``mask`` are a prefix of True values."""
  emissions = emissions.astype(jnp.float32)
  b = jnp.arange(emissions.shape[0])
  tags = jnp.where(mask, tags, 0)
  # Score of the gold path.
  score = start[tags[:, 0]] + emissions[b, 0, tags[:, 0]]
  steps = (emissions[:, 1:], tags[:, 1:], tags[:, :-1], mask[:, 1:])

  def gold(acc, xs):
    e, t, prev, m = xs
    return acc + m * (transitions[prev, t] + e[b, t]), None

  score, _ = jax.lax.scan(gold, score, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), steps))
  last = jnp.take_along_axis(tags, jnp.maximum(mask.sum(1) - 1, 0)[:, None], axis=1)[:, 0]
  score = score + end[last]
  # Partition function.
  alpha = start[None] + emissions[:, 0]

  def forward(alpha, xs):
    e, m = xs
    nxt = jax.nn.logsumexp(alpha[:, :, None] + transitions[None], axis=1) + e
    return jnp.where(m[:, None], nxt, alpha), None

  xs = (jnp.swapaxes(emissions[:, 1:], 0, 1), jnp.swapaxes(mask[:, 1:], 0, 1))
  alpha, _ = jax.lax.scan(forward, alpha, xs)
  log_z = jax.nn.logsumexp(alpha + end[None], axis=1)
  return jnp.where(mask[:, 0], score - log_z, 0.0)


def viterbi(emissions: Array, mask: Array, transitions: Array, start: Array, end: Array) -> Array:
  """The best tag path per row, ``[B, W]`` (0 where ``mask`` is False)."""
  emissions = emissions.astype(jnp.float32)
  score = start[None] + emissions[:, 0]

  def forward(score, xs):
    e, m = xs
    cand = score[:, :, None] + transitions[None]
    best_prev = jnp.argmax(cand, axis=1)
    nxt = jnp.max(cand, axis=1) + e
    return jnp.where(m[:, None], nxt, score), jnp.where(m[:, None], best_prev, -1)

  xs = (jnp.swapaxes(emissions[:, 1:], 0, 1), jnp.swapaxes(mask[:, 1:], 0, 1))
  score, back = jax.lax.scan(forward, score, xs)  # back: [W-1, B, K]
  last = jnp.argmax(score + end[None], axis=1)

  def backward(tag, bp):
    prev = jnp.take_along_axis(bp, tag[:, None], axis=1)[:, 0]
    prev = jnp.where(prev < 0, tag, prev)  # Past a row's end: stay on its last tag.
    return prev, tag

  first, rest = jax.lax.scan(backward, last, back, reverse=True)
  path = jnp.concatenate([first[None], rest], axis=0).T
  return jnp.where(mask, path, 0)

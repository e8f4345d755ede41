"""Greedy and beam-search decoding, jitted, over a key/value cache.

The search functions are model-agnostic: they drive ``step_fn(tokens [N], index, state,
static, beam_rows) -> (logits [N, V], state)``, where ``state`` is what changes per step (the
decoder's self-attention cache), ``static`` what does not (the cross-attention keys/values and
the source mask) and ``beam_rows`` (beam search; None for greedy) which row of its source holds
each beam's positions: beam search follows the surviving beams through that table instead of
reordering the cache (research.models.common's ``attention``). :func:`make_generate` glues an
:class:`research.models.seq2seq.EncoderDecoder` to them; with ``cache=False`` its step reruns
the whole decoder over the prefix instead (the reference the cached path is tested against).

Beam search follows fairseq: each step keeps the ``2k`` best continuations of the ``k`` alive
beams; those ending in EOS among the best ``k`` are finished (scored by log-probability over
the GNMT length penalty ``((5 + length) / 6) ** alpha``), the best ``k`` others stay alive; a
source is done once it has ``k`` finished hypotheses, and at ``max_length`` the alive beams are
finished as they are. With ``k = 1`` this is exactly greedy decoding (tested): the best
continuation ends the search when it is EOS and is kept alive otherwise. Both searches stop as
soon as every source is done. Token ids after EOS are ``pad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from research.models.common import argmax, beam_rows_at, gather_beams

Array = jax.Array
StepFn = Callable[[Array, Array, Any, Any, Array | None], tuple[Array, Any]]
NEG_INF = -jnp.inf


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT's ``((5 + length) / 6) ** alpha`` (1 for ``alpha = 0``)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def greedy(
  step_fn: StepFn,
  state: Any,
  static: Any,
  *,
  batch_size: int,
  max_length: int,
  bos: int,
  eos: int,
  pad: int,
) -> dict[str, Array]:
  """Arg-max decoding until EOS or ``max_length`` tokens.

  Returns:
    ``tokens`` [B, max_length] (EOS included, ``pad`` after it) and ``scores`` [B] (summed
    log-probabilities).
  """
  b = batch_size

  def cond(carry):
    i, _, _, _, finished, _ = carry
    return (i < max_length) & ~jnp.all(finished)

  def body(carry):
    i, cur, out, score, finished, state = carry
    logits, state = step_fn(cur, i, state, static, None)
    cand = score[:, None] + jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # The same arithmetic as beam search's candidates, so beam size 1 ties break identically.
    nxt = argmax(cand)
    tok = jnp.where(finished, pad, nxt)
    score = jnp.where(finished, score, jnp.take_along_axis(cand, nxt[:, None], axis=1)[:, 0])
    out = out.at[:, i].set(tok)
    return i + 1, tok, out, score, finished | (tok == eos), state

  init = (
    jnp.zeros([], jnp.int32),
    jnp.full((b,), bos, jnp.int32),
    jnp.full((b, max_length), pad, jnp.int32),
    jnp.zeros((b,), jnp.float32),
    jnp.zeros((b,), bool),
    state,
  )
  _, _, tokens, scores, _, _ = jax.lax.while_loop(cond, body, init)
  return {"tokens": tokens, "scores": scores}


def beam_search(
  step_fn: StepFn,
  state: Any,
  static: Any,
  *,
  batch_size: int,
  beam_size: int,
  max_length: int,
  bos: int,
  eos: int,
  pad: int,
  alpha: float = 0.6,
) -> dict[str, Array]:
  """Beam search (see module docstring). ``state``/``static`` rows are [B * beam_size, ...].

  Returns:
    ``tokens`` [B, max_length] of the best finished hypothesis (EOS included, ``pad`` after)
    and its ``scores`` [B] (log-probability / length penalty).
  """
  b, k, n = batch_size, beam_size, max_length
  rank = jnp.arange(2 * k)

  def cond(carry):
    i, done = carry[0], carry[6]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, cur, alive_seqs, alive_scores, fin_seqs, fin_scores, done, state, rows = carry
    rows = beam_rows_at(rows, i)
    logits, state = step_fn(cur.reshape(b * k), i, state, static, rows)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    cand = (alive_scores[..., None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    vals, idx = jax.lax.top_k(cand, 2 * k)
    beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = gather_beams(alive_seqs, beam).at[:, :, i].set(tok)  # [B, 2k, n]
    is_eos = tok == eos
    # Finished: EOS among the best k, for sources not done yet.
    new = is_eos & (rank < k)[None, :] & ~done[:, None]
    new_scores = jnp.where(new, vals / length_penalty(i + 1, alpha), NEG_INF)
    fin_scores, j = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
    fin_seqs = gather_beams(jnp.concatenate([fin_seqs, seqs], axis=1), j)
    # Alive: the best k that do not end in EOS (there are at least k among the 2k).
    alive_scores, j = jax.lax.top_k(jnp.where(is_eos, NEG_INF, vals), k)
    alive_seqs = gather_beams(seqs, j)
    rows = gather_beams(rows, gather_beams(beam, j))  # The cache stays; its rows are followed.
    done = done | (jnp.sum(jnp.isfinite(fin_scores), axis=1) >= k)
    cur = gather_beams(tok, j)
    return i + 1, cur, alive_seqs, alive_scores, fin_seqs, fin_scores, done, state, rows

  first = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)  # Identical beams: expand one.
  init = (
    jnp.zeros([], jnp.int32),
    jnp.full((b, k), bos, jnp.int32),
    jnp.full((b, k, n), pad, jnp.int32),
    jnp.broadcast_to(first, (b, k)).astype(jnp.float32),
    jnp.full((b, k, n), pad, jnp.int32),
    jnp.full((b, k), NEG_INF, jnp.float32),
    jnp.zeros((b,), bool),
    state,
    jnp.zeros((b, k, n), jnp.int32),
  )
  i, _, alive_seqs, alive_scores, fin_seqs, fin_scores, done, _, _ = jax.lax.while_loop(
    cond, body, init
  )
  # Sources without k finished hypotheses at max_length: their alive beams compete as they are.
  forced = jnp.where(done[:, None], NEG_INF, alive_scores / length_penalty(i, alpha))
  scores, j = jax.lax.top_k(jnp.concatenate([fin_scores, forced], axis=1), 1)
  tokens = gather_beams(jnp.concatenate([fin_seqs, alive_seqs], axis=1), j)
  return {"tokens": tokens[:, 0], "scores": scores[:, 0]}


def prepare(
  model: Any,
  params: Any,
  batch: dict[str, Array],
  task: str,
  *,
  beam_size: int,
  max_length: int,
  pad: int,
  cache: bool = True,
) -> tuple[StepFn, Any, Any]:
  """``(step_fn, state, static)`` of an EncoderDecoder for the searches above (traceable).

  Encodes the source once; with ``beam_size`` k, every row is repeated k times. With ``cache``
  the state is the self-attention cache and ``static`` the cross keys/values and source mask;
  without, the state is the tokens each row wrote (kept like a cache), each beam's prefix read
  through ``beam_rows`` and rerun through the whole decoder at every step.
  """
  variables = {"params": params}
  mask = batch["attention_mask"]
  memory = model.apply(
    variables, batch["input_ids"], mask, batch.get("token_type_ids"), method=model.encode
  )
  if beam_size > 1:  # Every beam of a source sees the same encoder states.
    memory = jnp.repeat(memory, beam_size, axis=0)
    mask = jnp.repeat(mask, beam_size, axis=0)
  if cache:
    kv = model.apply(variables, memory, max_length, method=model.init_cache)

    def cached_step(tokens, index, own, static, beam_rows):
      cross, mask = static
      logits, new = model.apply(
        variables,
        tokens,
        index,
        {"self": own, "cross": cross},
        mask,
        task=task,
        beam_rows=beam_rows,
        method=model.decode_step,
      )
      return logits, new["self"]

    return cached_step, kv["self"], (kv["cross"], mask)

  def uncached_step(tokens, index, written, static, beam_rows):
    memory, mask = static
    written = written.at[:, index].set(tokens)  # Like a cache: each row writes its own.
    prefix = written
    if beam_rows is not None:  # Each beam's own tokens, read from the rows holding them.
      groups, beams, length = beam_rows.shape
      rows = written.reshape(groups, beams, length)
      prefix = jnp.take_along_axis(rows, beam_rows, axis=1).reshape(written.shape)
    logits = model.apply(variables, prefix, memory, mask, task=task, method=model.decode)
    return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False), written

  prefix = jnp.full((memory.shape[0], max_length), pad, jnp.int32)
  return uncached_step, prefix, (memory, mask)


def make_generate(
  model: Any,
  task: str,
  *,
  max_length: int,
  bos: int,
  eos: int,
  pad: int,
  beam_size: int = 1,
  alpha: float = 0.6,
  cache: bool = True,
) -> Callable[[Any, dict[str, Array]], dict[str, Array]]:
  """A jitted ``generate(params, batch) -> {'tokens', 'scores'}`` for an EncoderDecoder.

  Args:
    model: the EncoderDecoder.
    task: whose LM head scores the tokens.
    max_length: most tokens generated per source (EOS included).
    bos / eos / pad: the decoder start, end and padding ids.
    beam_size: 1 is greedy decoding; more is beam search.
    alpha: the length penalty's exponent (beam search only).
    cache: decode with the key/value cache (False reruns the decoder over the prefix).

  ``batch`` needs ``input_ids`` and ``attention_mask`` (``token_type_ids`` optional); it is
  compiled once per source shape.
  """

  def generate(params, batch):
    step_fn, state, static = prepare(
      model, params, batch, task, beam_size=beam_size, max_length=max_length, pad=pad, cache=cache
    )
    b = batch["input_ids"].shape[0]
    common = dict(batch_size=b, max_length=max_length, bos=bos, eos=eos, pad=pad)
    if beam_size == 1:
      return greedy(step_fn, state, static, **common)
    return beam_search(step_fn, state, static, beam_size=beam_size, alpha=alpha, **common)

  return jax.jit(generate)


def strip(tokens: Any, eos: int) -> list[list[int]]:
  """Host-side: each row's tokens before its first EOS."""
  out = []
  for row in tokens.tolist():
    out.append(row[: row.index(eos)] if eos in row else row)
  return out

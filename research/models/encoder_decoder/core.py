"""What the pretrained encoder-decoder families share: masks, attention, the cache, generation.

The seam every encoder-decoder family follows (T5 here; BART, mBART and Marian beside it):

- **Params.** The whole model's tree is ``{'encoder': ..., 'decoder': ..., <top-level extras>}``.
  A token table shared by encoder and decoder is stored once, under ``encoder/`` (T5:
  ``encoder/embeddings/word_embeddings/embedding``); the decoder reads it from its parent. An
  untied output layer sits at a top-level path (``lm_head/kernel``), as would a final-logits
  bias. The family's ``encoder`` module alone builds exactly the ``encoder`` subtree, so one
  weight map serves classification from the encoder (TaskModel, default graft rules
  ``encoder/(.*)``) and the seq2seq model (``Family.seq2seq``).
- **Interface of ``Family.seq2seq``** (that of research.models.seq2seq.EncoderDecoder, one LM
  head): ``__call__(input_ids, attention_mask=None, token_type_ids=None, decoder_input_ids=None,
  decoder_attention_mask=None, *, deterministic=True)`` -> logits ``[B, T, V]`` fp32 under
  teacher forcing; ``encode(input_ids, attention_mask, token_type_ids=None, *, deterministic)``
  -> memory ``[B, S, D]``; ``decode(decoder_input_ids, memory, attention_mask,
  decoder_attention_mask=None, *, deterministic=True, task=None)`` -> logits;
  ``init_cache(memory, max_length)`` -> cache; ``decode_step(ids [B], index, cache,
  attention_mask, *, task=None, beam_rows=None)`` -> ``(logits [B, V], cache)``. ``task`` is
  accepted and ignored so research.models.decoding's fairseq-style search drives these models
  too; ``beam_rows`` (beam search) goes to the self-attention.
- **Cache** (:func:`empty_self_cache`): ``{'self': ({'key', 'value'}: [B, heads, max_length,
  head_dim], ...), 'cross': ({'key', 'value'}: [B, heads, S, head_dim], ...)}``, one entry per
  decoder layer, heads-major (research.models.common's ``attention`` says why). ``self`` is
  written at ``index`` by each step (research.models.common's ``write_kv_cache``; beam search
  never reorders it: ``decode_step(..., beam_rows=)`` says which row holds each beam's
  positions, research.models.common's ``attention``); ``cross`` is projected once from the
  memory by ``init_cache`` and never changes.

Generation (:func:`generate`) reproduces transformers' ``generate(do_sample=False, ...)`` for
encoder-decoder models, token for token: greedy decoding, and its beam search, which differs from
research.models.decoding's fairseq-style one. transformers keeps the ``2k`` best continuations,
lets those ending in EOS among the best ``k`` enter a pool of ``k`` finished hypotheses scored
``sum_logprobs / generated_length ** length_penalty``, stops a source by its ``early_stopping``
rule (True: ``k`` finished; False: the best alive beam at its current length cannot beat the
worst finished; ``"never"``: the same at ``max_length`` when ``length_penalty > 0``), and at
``max_length`` finishes the alive beams as they are. The logits processors a checkpoint's config
turns on by default are here too: ``min_length``, ``forced_bos_token_id`` (BART's first token)
and ``forced_eos_token_id`` (EOS forced at the last position). Everything is static-shaped and
runs in one ``jax.lax.while_loop`` over the key/value cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models.common import (
  argmax,
  attention,
  beam_rows_at,
  dropout,
  empty_kv_cache,
  gather_beams,
)

Array = jax.Array
# step_fn(tokens [N], index, state, static, beam_rows [G, k, S] or None) -> (logits, state).
StepFn = Callable[[Array, Array, Any, Any, Array | None], tuple[Array, Any]]
NEG = float(np.finfo(np.float32).min)  # Additive mask: finite, so fully masked rows stay finite.
HF_NEG = -1.0e9  # transformers' beam search marks impossible beams by adding this.


# --- masks and attention -------------------------------------------------------------------------


def key_bias(mask: Array) -> Array:
  """``[B, 1, 1, S]`` fp32 additive bias hiding the padded keys of ``mask [B, S]``."""
  return jnp.where(mask[:, None, None, :] > 0, 0.0, NEG).astype(jnp.float32)


def causal_bias(mask: Array | None, length: int, offset: Array | int = 0) -> Array:
  """``[B or 1, 1, length, S]`` fp32 bias: the query at ``offset + i`` sees keys ``j <= offset +
  i`` that ``mask [B, S]`` (None: all real, ``S = length``) does not hide."""
  s = length if mask is None else mask.shape[-1]
  queries = offset + jnp.arange(length, dtype=jnp.int32)
  allowed = (jnp.arange(s, dtype=jnp.int32)[None, :] <= queries[:, None])[None, None]
  if mask is not None:
    allowed = allowed & (mask[:, None, None, :] > 0)
  return jnp.where(allowed, 0.0, NEG).astype(jnp.float32)


def attend(
  module: nn.Module,
  q: Array,
  k: Array,
  v: Array,
  bias: Array,
  rate: float,
  deterministic: bool,
  scale: float | None = None,
  heads_major: bool = False,
  beam_rows: Array | None = None,
) -> Array:
  """Softmax attention ``q [B,T,H,D]`` over ``k, v [B,S,H,D]`` (``[B,H,S,D]`` from the cache:
  ``heads_major``) with an additive fp32 ``bias`` broadcastable to ``[B,H,T,S]`` (masks and
  position biases summed by the caller); ``beam_rows``: research.models.common's ``attention``.

  ``scale`` None leaves the scores unscaled, as T5 (which folds ``1/sqrt(d)`` into its init);
  research.models.common.attention (``jax.nn.dot_product_attention``: fused on GPUs) with logits
  and softmax in fp32, the weighted sum in the inputs' dtype. Returns ``[B, T, H, D]``.
  """
  drop = None
  if rate and not deterministic:
    drop = lambda w: dropout(module, w, rate, deterministic)
  scale = 1.0 if scale is None else scale
  return attention(
    q,
    k,
    v,
    bias=bias,
    scale=scale,
    weights_dropout=drop,
    heads_major=heads_major,
    beam_rows=beam_rows,
  )


def empty_self_cache(
  batch: int, length: int, layers: int, heads: int, head_dim: int, dtype: Any = jnp.float32
) -> tuple[dict[str, Array], ...]:
  """The ``self`` part of the cache: zero keys/values ``[batch, heads, length, head_dim]``."""
  return tuple(empty_kv_cache(batch, length, heads, head_dim, dtype) for _ in range(layers))


# --- generation ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """The settings of transformers' ``generate(do_sample=False, ...)`` this module reproduces.

  ``max_new_tokens`` counts the generated tokens (EOS included), not the decoder start token;
  ``early_stopping`` is True, False or ``"never"`` (transformers' meanings, see the module
  docstring); ``min_length`` counts the decoder start token, as transformers' does.
  """

  max_new_tokens: int = 20
  num_beams: int = 1
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  decoder_start_token_id: int = 0
  eos_token_id: int = 1
  pad_token_id: int = 0
  forced_bos_token_id: int | None = None
  forced_eos_token_id: int | None = None
  min_length: int = 0

  def __post_init__(self):
    if self.early_stopping not in (True, False, "never"):
      raise ValueError(f"early_stopping={self.early_stopping!r}: expected True, False or 'never'")
    if self.max_new_tokens < 1 or self.num_beams < 1:
      raise ValueError("max_new_tokens and num_beams must be at least 1")

  @classmethod
  def for_model(cls, config: Any, **overrides: Any) -> GenerationConfig:
    """The special tokens a family's config states (``decoder_start_token_id``,
    ``eos_token_id``, ``pad_token_id``, ``forced_bos_token_id``, ``forced_eos_token_id``,
    where it has them), with ``overrides`` on top."""
    names = [f.name for f in dataclasses.fields(cls) if f.name.endswith("_token_id")]
    found = {n: getattr(config, n) for n in names if getattr(config, n, None) is not None}
    return cls(**{**found, **overrides})

  def replace(self, **kwargs: Any) -> GenerationConfig:
    return dataclasses.replace(self, **kwargs)


def _process(scores: Array, i: Array, gen: GenerationConfig) -> Array:
  """transformers' default logits processors, in its order, at step ``i`` (``cur_len = i + 1``:
  the decoder start token counts): min length, forced BOS, forced EOS."""
  vocab = jnp.arange(scores.shape[-1])

  def force(token: int, when: Array) -> Array:
    forced = jnp.where(vocab == token, 0.0, -jnp.inf).astype(scores.dtype)
    return jnp.where(when, forced[None, :], scores)

  if gen.min_length > 0:
    hide = (i + 1 < gen.min_length) & (vocab == gen.eos_token_id)
    scores = jnp.where(hide[None, :], -jnp.inf, scores)
  if gen.forced_bos_token_id is not None:
    scores = force(gen.forced_bos_token_id, i == 0)
  if gen.forced_eos_token_id is not None:
    scores = force(gen.forced_eos_token_id, i == gen.max_new_tokens - 1)
  return scores


def greedy_search(step_fn: StepFn, state: Any, static: Any, batch: int, gen: GenerationConfig):
  """transformers' greedy search: arg-max of the processed logits; ``pad`` once a row has EOS.

  Returns ``{'tokens': [B, max_new_tokens], 'scores': [B]}`` (scores: summed log-probabilities
  of the chosen tokens under the processed distribution).
  """
  n = gen.max_new_tokens

  def cond(carry):
    i, finished = carry[0], carry[4]
    return (i < n) & ~jnp.all(finished)

  def body(carry):
    i, cur, out, score, finished, state = carry
    logits, state = step_fn(cur, i, state, static, None)
    scores = _process(logits.astype(jnp.float32), i, gen)
    tok = argmax(scores)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), tok[:, None], axis=1)[:, 0]
    score = jnp.where(finished, score, score + logp)
    tok = jnp.where(finished, gen.pad_token_id, tok)
    return i + 1, tok, out.at[:, i].set(tok), score, finished | (tok == gen.eos_token_id), state

  init = (
    jnp.zeros([], jnp.int32),
    jnp.full((batch,), gen.decoder_start_token_id, jnp.int32),
    jnp.full((batch, n), gen.pad_token_id, jnp.int32),
    jnp.zeros((batch,), jnp.float32),
    jnp.zeros((batch,), bool),
    state,
  )
  _, _, tokens, scores, _, _ = jax.lax.while_loop(cond, body, init)
  return {"tokens": tokens, "scores": scores}


def beam_search(step_fn: StepFn, state: Any, static: Any, batch: int, gen: GenerationConfig):
  """transformers' beam search (``GenerationMixin._beam_search``) with static shapes.

  ``state``/``static`` rows are ``[batch * num_beams, ...]``. The arithmetic follows
  transformers' step for step (the ``-1e9`` offsets that retire beams, the length penalty on
  the generated length, the early-stopping heuristic), so the chosen tokens agree wherever the
  two models' log-probabilities agree. Returns ``{'tokens': [B, max_new_tokens], 'scores': [B]}``
  of the best finished hypothesis (``pad`` after its end) and its length-penalised score.
  """
  b, k, n = batch, gen.num_beams, gen.max_new_tokens
  lp = gen.length_penalty
  # (length ** penalty) as transformers computes it: a Python float, applied in fp32.
  penalty = jnp.asarray(np.array([(m**lp) for m in range(1, n + 1)], np.float32))
  top_k_mask = jnp.arange(2 * k) < k
  never = gen.early_stopping == "never" and lp > 0.0
  early = gen.early_stopping is True

  def cond(carry):
    return (carry[0] < n) & ~carry[-1]

  def body(carry):
    i, cur, alive, alive_scores, fin, fin_scores, fin_done, open_, state, rows, _ = carry
    rows = beam_rows_at(rows, i)
    logits, state = step_fn(cur.reshape(b * k), i, state, static, rows)
    logp = _process(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), i, gen)
    vocab = logp.shape[-1]
    cand = (logp.reshape(b, k, vocab) + alive_scores[..., None]).reshape(b, k * vocab)
    vals, idx = jax.lax.top_k(cand, 2 * k)
    beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = gather_beams(alive, beam).at[:, :, i].set(tok)  # [B, 2k, n]
    hits = (tok == gen.eos_token_id) | (i + 1 >= n)
    # Alive: the best k that did not just finish.
    running = vals + hits.astype(jnp.float32) * HF_NEG
    _, j = jax.lax.top_k(running, k)
    alive, alive_scores = gather_beams(seqs, j), gather_beams(running, j)
    rows = gather_beams(rows, gather_beams(beam, j))  # The cache stays; its rows are followed.
    # Finished: those among the best k that hit EOS or max length, if they may still enter.
    new = hits & top_k_mask[None, :]
    scores = vals / penalty[i]
    full = jnp.all(fin_done, axis=-1, keepdims=True) & early
    scores = scores + full.astype(jnp.float32) * HF_NEG
    scores = scores + (~open_).astype(jnp.float32) * HF_NEG
    scores = scores + (~new).astype(jnp.float32) * HF_NEG
    merged = jnp.concatenate([fin_scores, scores], axis=1)
    fin_scores, j2 = jax.lax.top_k(merged, k)
    fin = gather_beams(jnp.concatenate([fin, seqs], axis=1), j2)
    fin_done = gather_beams(jnp.concatenate([fin_done, new], axis=1), j2)
    # The early-stopping heuristic, at the new length i + 2 (start token included).
    best = alive_scores[:, :1] / penalty[n - 1 if never else i]
    worst = jnp.where(fin_done, jnp.min(fin_scores, axis=1, keepdims=True), HF_NEG)
    open_ = open_ & jnp.any(best > worst, axis=-1, keepdims=True)
    stop = ~(jnp.any(open_) & ~(jnp.all(fin_done) & early) & ~jnp.all(hits))
    cur = alive[:, :, i]
    return i + 1, cur, alive, alive_scores, fin, fin_scores, fin_done, open_, state, rows, stop

  first = jnp.where(jnp.arange(k) == 0, 0.0, HF_NEG).astype(jnp.float32)
  init = (
    jnp.zeros([], jnp.int32),
    jnp.full((b, k), gen.decoder_start_token_id, jnp.int32),
    jnp.full((b, k, n), gen.pad_token_id, jnp.int32),
    jnp.broadcast_to(first, (b, k)),
    jnp.full((b, k, n), gen.pad_token_id, jnp.int32),
    jnp.full((b, k), HF_NEG, jnp.float32),
    jnp.zeros((b, k), bool),
    jnp.ones((b, 1), bool),
    state,
    jnp.zeros((b, k, n), jnp.int32),
    jnp.zeros([], bool),
  )
  out = jax.lax.while_loop(cond, body, init)
  tokens, scores = out[4][:, 0], out[5][:, 0]
  # Positions after the end of a hypothesis hold whatever the alive beam it came from held.
  ended = jnp.cumsum(tokens == gen.eos_token_id, axis=1) - (tokens == gen.eos_token_id) > 0
  return {"tokens": jnp.where(ended, gen.pad_token_id, tokens), "scores": scores}


def prepare(
  model: Any, params: Any, input_ids: Array, attention_mask: Array, beams: int, length: int
) -> tuple[StepFn, Any, Any]:
  """``(step_fn, state, static)`` of a ``Family.seq2seq`` model: the source encoded once and
  repeated per beam, the self-attention cache as the state (followed along beams by
  ``beam_rows``, never reordered), the
  cross-attention keys/values and the source mask as the static part."""
  variables = {"params": params}
  memory = model.apply(variables, input_ids, attention_mask, method=model.encode)
  if beams > 1:
    memory = jnp.repeat(memory, beams, axis=0)
    attention_mask = jnp.repeat(attention_mask, beams, axis=0)
  cache = model.apply(variables, memory, length, method=model.init_cache)

  def step(tokens, index, own, static, beam_rows):
    cross, mask = static
    cache = {"self": own, "cross": cross}
    logits, new = model.apply(
      variables, tokens, index, cache, mask, beam_rows=beam_rows, method=model.decode_step
    )
    return logits, new["self"]

  return step, cache["self"], (cache["cross"], attention_mask)


def generate(
  model: Any, params: Any, input_ids: Array, attention_mask: Array, gen: GenerationConfig
) -> dict[str, Array]:
  """``{'tokens': [B, gen.max_new_tokens], 'scores': [B]}``: transformers' ``generate`` output
  without its leading decoder start token, ``pad`` after EOS (traceable; see :func:`make_generate`).
  """
  step, state, static = prepare(
    model, params, input_ids, attention_mask, gen.num_beams, gen.max_new_tokens
  )
  search = greedy_search if gen.num_beams == 1 else beam_search
  return search(step, state, static, input_ids.shape[0], gen)


def make_generate(model: Any, gen: GenerationConfig) -> Callable[[Any, Array, Array], dict]:
  """A jitted ``generate(params, input_ids, attention_mask)`` (compiled once per source shape)."""
  return jax.jit(functools.partial(generate, model, gen=gen))

r"""EncoderDecoder: a (pretrained) encoder, a Transformer decoder and LM heads.

Params are ``{'encoder', 'decoder', 'heads': {task: {'bias'}}}`` in the tree conventions of
docs/design.md: ``encoder`` is the encoder of the checkpoint's model family
(research.models.families; the same module and paths as TaskModel's, so the pretrained
checkpoint grafts unchanged),
``decoder`` is research.models.decoder.Decoder, and each seq2seq task's head is the bias of
the output layer, whose weights are tied to the decoder's word embeddings. The decoder's
vocabulary is the target vocabulary: the encoder's own (one tokenizer for both sides), or
another one (a cased target vocabulary trained on the data, research.tasks.seq2seq_text), in
which case the two embedding tables simply differ in size.

Init modes as in Rothe et al. 2020 ("Leveraging Pre-trained Checkpoints for Sequence Generation
Tasks"), each a list of graft rules so the graft report shows what came from where:

- ``rnd2rnd``: everything at init (scratch);
- ``bert2rnd``: the encoder from the checkpoint, the decoder and heads at init;
- ``bert2bert``: also the decoder's embeddings, self-attention and feed-forward blocks from
  the encoder's (decoder layer i from encoder layer i); cross-attention and its LayerNorm stay
  at init, as in the paper. Copying the word embeddings needs the encoder's vocabulary on the
  target side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import families
from research.models.config import EncoderConfig
from research.models.decoder import Cache, Decoder

Array = jax.Array
INIT_MODES = ("rnd2rnd", "bert2rnd", "bert2bert")
ENCODER_RULES = (("encoder/(.*)", r"encoder/\1"),)
# Decoder <- encoder (BERT2BERT); the explicit None rule documents what stays at init.
DECODER_FROM_ENCODER = (
  ("decoder/embeddings/(.*)", r"encoder/embeddings/\1"),
  (
    r"decoder/layer_(\d+)/(attention|attention_norm|ffn|output_norm)/(.*)",
    r"encoder/layer_\1/\2/\3",
  ),
  (r"decoder/layer_\d+/cross_attention(_norm)?/.*", None),
)


def init_plan(mode: str) -> tuple[str, tuple[tuple[str, str | None], ...]]:
  """``(model.init, graft rules)`` of a Rothe et al. init mode.

  Raises:
    ValueError: an unknown mode.
  """
  if mode == "rnd2rnd":
    return "scratch", ()
  if mode == "bert2rnd":
    return "pretrained", ENCODER_RULES
  if mode == "bert2bert":
    return "pretrained", ENCODER_RULES + DECODER_FROM_ENCODER
  raise ValueError(f"seq2seq init mode {mode!r}: expected one of {INIT_MODES}")


class LMHead(nn.Module):
  """The bias of the tied output layer of one task."""

  vocab_size: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, logits: Array) -> Array:
    bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
    return logits + bias.astype(jnp.float32)


class LMHeads(nn.Module):
  """One LMHead per task, under ``heads/<task>``."""

  tasks: tuple[str, ...]
  vocab_size: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, logits: Array, tasks: Sequence[str]) -> dict[str, Array]:
    unknown = [t for t in tasks if t not in self.tasks]
    if unknown:
      raise KeyError(f"unknown task(s) {unknown}; this model has heads {sorted(self.tasks)}")
    return {t: LMHead(self.vocab_size, self.param_dtype, name=t)(logits) for t in tasks}


class EncoderDecoder(nn.Module):
  """Encoder, decoder and LM heads; ``__call__`` is teacher forcing, the rest is decoding.

  Attributes:
    encoder_config / decoder_config: the two architectures; ``decoder_config.vocab_size`` is
      the target vocabulary's (the encoder's, or a separate one).
    tasks: names of the seq2seq tasks (one LM head each).
    dtype / param_dtype: compute and storage dtypes.
    remat: rematerialise encoder layers in the backward pass.
  """

  encoder_config: EncoderConfig
  decoder_config: EncoderConfig
  tasks: tuple[str, ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  # Batch fields that research.train.steps.apply_model passes on as keyword arguments.
  DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask")

  @property
  def task_names(self) -> tuple[str, ...]:
    return self.tasks

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    encoder_cls = families.family_of(self.encoder_config).encoder
    self.encoder = encoder_cls(self.encoder_config, remat=self.remat, **kw)
    self.decoder = Decoder(self.decoder_config, **kw)
    self.heads = LMHeads(self.tasks, self.decoder_config.vocab_size, self.param_dtype)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    decoder_input_ids: Array | None = None,
    decoder_attention_mask: Array | None = None,
    *,
    tasks: Sequence[str] | None = None,
    deterministic: bool = True,
  ) -> dict[str, Array]:
    """``{task: logits [B, T, V]}`` of the targets given ``decoder_input_ids`` (teacher forcing).

    Without ``decoder_input_ids`` a target of zeros as long as the source stands in (what
    ``init`` needs; source ids could lie outside a smaller target vocabulary).
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    memory = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    if decoder_input_ids is None:
      decoder_input_ids, decoder_attention_mask = jnp.zeros_like(input_ids), attention_mask
    hidden = self.decoder(
      decoder_input_ids, memory, attention_mask, decoder_attention_mask, deterministic
    )
    tasks = self.tasks if tasks is None else tuple(tasks)
    return self.heads(self.decoder.logits(hidden), tasks)

  def encode(
    self,
    input_ids: Array,
    attention_mask: Array,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    """Encoder hidden states [B, S, D]."""
    out = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    return out["hidden_states"]

  def decode(
    self,
    decoder_input_ids: Array,
    memory: Array,
    attention_mask: Array,
    decoder_attention_mask: Array | None = None,
    *,
    task: str,
  ) -> Array:
    """Logits [B, T, V] of a whole target prefix given the encoder states (no cache)."""
    hidden = self.decoder(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
    return self.heads(self.decoder.logits(hidden), (task,))[task]

  def init_cache(self, memory: Array, max_length: int) -> Cache:
    """The decoding cache for ``max_length`` target positions over ``memory``."""
    return self.decoder.init_cache(memory, max_length)

  def decode_step(
    self,
    ids: Array,
    index: Array,
    cache: Cache,
    attention_mask: Array,
    *,
    task: str,
    beam_rows: Array | None = None,
  ) -> tuple[Array, Cache]:
    """Logits [B, V] for the position after ``ids`` [B] (at ``index``), and the new cache
    (``beam_rows``: research.models.common's ``attention``)."""
    hidden, cache = self.decoder.step(ids, index, cache, attention_mask, beam_rows)
    return self.heads(self.decoder.logits(hidden), (task,))[task], cache


class FamilySeq2Seq(nn.Module):
  """A pretrained encoder-decoder family's own model (T5, BART, Marian) behind EncoderDecoder's
  interface.

  The family's module shares this module's scope, so the params are exactly the family's
  (``{'encoder', 'decoder', ...}``, the paths its HF weight map names) and a checkpoint loads
  and exports unchanged. Its one LM head serves every task: the tasks of a multi-task run
  differ by their data (T5's task prefixes), not by their output layer.

  Attributes:
    config: the family's config (its ``Family.seq2seq`` is the module built).
    tasks: names of the seq2seq tasks.
  """

  config: Any
  tasks: tuple[str, ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  DECODER_INPUTS = EncoderDecoder.DECODER_INPUTS

  @property
  def task_names(self) -> tuple[str, ...]:
    return self.tasks

  def setup(self):
    module = families.family_of(self.config).seq2seq
    self.model = module(
      self.config, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat
    )
    nn.share_scope(self, self.model)

  def _check(self, tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in self.tasks]
    if unknown:
      raise KeyError(f"unknown task(s) {unknown}; this model has tasks {sorted(self.tasks)}")

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    decoder_input_ids: Array | None = None,
    decoder_attention_mask: Array | None = None,
    *,
    tasks: Sequence[str] | None = None,
    deterministic: bool = True,
  ) -> dict[str, Array]:
    """``{task: logits [B, T, V]}`` under teacher forcing (the same logits for every task)."""
    tasks = self.tasks if tasks is None else tuple(tasks)
    self._check(tasks)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if decoder_input_ids is None:  # What ``init`` needs: a target as long as the source.
      decoder_input_ids, decoder_attention_mask = jnp.zeros_like(input_ids), attention_mask
    logits = self.model(
      input_ids,
      attention_mask,
      token_type_ids,
      decoder_input_ids,
      decoder_attention_mask,
      deterministic=deterministic,
    )
    return dict.fromkeys(tasks, logits)

  def encode(
    self,
    input_ids: Array,
    attention_mask: Array,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
  ) -> Array:
    return self.model.encode(input_ids, attention_mask, deterministic=deterministic)

  def decode(
    self,
    decoder_input_ids: Array,
    memory: Array,
    attention_mask: Array,
    decoder_attention_mask: Array | None = None,
    *,
    task: str,
  ) -> Array:
    self._check((task,))
    return self.model.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

  def init_cache(self, memory: Array, max_length: int) -> Cache:
    return self.model.init_cache(memory, max_length)

  def decode_step(
    self,
    ids: Array,
    index: Array,
    cache: Cache,
    attention_mask: Array,
    *,
    task: str,
    beam_rows: Array | None = None,
  ) -> tuple[Array, Cache]:
    self._check((task,))
    return self.model.decode_step(ids, index, cache, attention_mask, beam_rows=beam_rows)


def make_model(
  encoder: Any,
  tasks: Sequence[str],
  decoder_overrides: dict[str, Any] | None = None,
  **kwargs: Any,
) -> EncoderDecoder | FamilySeq2Seq:
  """The seq2seq model of an encoder config.

  A pretrained encoder-decoder family's config (one whose family has ``seq2seq``) gives that
  family's whole model (:class:`FamilySeq2Seq`; ``decoder_overrides`` must be empty: its
  decoder is the checkpoint's). Any other family's encoder gives an EncoderDecoder whose
  decoder is the encoder's architecture with ``decoder_overrides`` (``vocab_size`` there gives
  the decoder a target vocabulary of its own); the encoder's pooler is dropped (nothing reads
  it), so its checkpoint weights show up as 'unused in source' in the graft report.

  Raises:
    ValueError: ``decoder_overrides`` for a pretrained encoder-decoder.
  """
  if families.family_of(encoder).seq2seq is not None:
    if decoder_overrides:
      raise ValueError(
        f"model.decoder_overrides={decoder_overrides}: a pretrained encoder-decoder "
        f"({type(encoder).__name__}) keeps its own decoder"
      )
    return FamilySeq2Seq(encoder, tuple(tasks), **kwargs)
  encoder = encoder.replace(use_pooler=False)
  decoder = encoder.replace(**dict(decoder_overrides or {}))
  return EncoderDecoder(encoder, decoder, tuple(tasks), **kwargs)

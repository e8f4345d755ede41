"""A CNN sentence classifier (Kim, 2014) as a model family: word-vector transfer, no Transformer.

Kim's model: token embeddings, 1-D convolutions of several widths (3, 4, 5 with 100 filters
each), ReLU, max-pooled over time, concatenated; the task head (dropout, then a linear layer)
reads the concatenation. It is here for two reasons. It is the classic word-vector transfer
baseline: its embedding table is grafted from a pretrained model's input embeddings (MiniLM's
``encoder/embeddings/word_embeddings/embedding``, see :data:`GRAFT_RULES`), and it reads that
model's tokenizer, so the comparison with a random table isolates what the word vectors carry.
And it proves that a family need not be a Transformer: it plugs into the registry with the
encoder interface (``{'hidden_states', 'pooled'}``) and no HF weight names of its own.

The architecture comes from the checkpoint a run names in ``model.checkpoint`` (its
config.json gives the vocabulary, the padding id and the embedding width, so the grafted table
fits), with ``model.family='cnn'`` selecting this family and ``model.encoder_overrides`` setting
the widths and filter count. Padding is masked: its embeddings are zeroed before the
convolutions ("same" zero padding, as at the sentence ends) and its outputs before the max; as
every feature is a ReLU (>= 0), a zero never beats a real position's value, so the pooled
features do not depend on how much padding a batch has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.family import Family

Array = jax.Array

# MiniLM's (any BERT-like checkpoint's) input word vectors into the CNN's embedding table.
GRAFT_RULES = (
  ("encoder/word_embeddings/embedding", "encoder/embeddings/word_embeddings/embedding"),
)


@dataclasses.dataclass(frozen=True)
class CnnConfig:
  """Architecture of the CNN (hashable, so it can sit inside a linen Module).

  Attributes:
    vocab_size / pad_token_id: the tokenizer's (from the checkpoint's config.json).
    embedding_dim: width of the word vectors (the checkpoint's input embedding width).
    widths: convolution widths, one bank of ``filters`` filters each.
    filters: filters per width.
    embedding_init_scale: a random table is uniform in [-scale, scale] (Kim's CNN-rand: 0.25).
  """

  vocab_size: int = 30522
  pad_token_id: int = 0
  embedding_dim: int = 384
  widths: tuple[int, ...] = (3, 4, 5)
  filters: int = 100
  embedding_init_scale: float = 0.25

  def __post_init__(self):
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    if not self.widths or min(self.widths) < 1 or self.filters < 1:
      raise ValueError(f"CnnConfig: widths {self.widths} and filters {self.filters} must be >= 1")

  @property
  def hidden_size(self) -> int:
    """Width of the features the heads read: one per filter."""
    return self.filters * len(self.widths)

  def replace(self, **kwargs: Any) -> CnnConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> CnnConfig:
    """A CNN whose vocabulary and embedding width are those of a Transformer checkpoint.

    Reads ``vocab_size``, ``pad_token_id`` and the input embedding width (``embedding_size``
    for ELECTRA, ``hidden_size`` or DistilBERT's ``dim`` otherwise) of any model's config.json.

    Raises:
      ValueError: no vocabulary size or width in the file, naming ``source``.
    """
    width = hf.get("embedding_size") or hf.get("hidden_size") or hf.get("dim")
    if "vocab_size" not in hf or not width:
      raise ValueError(f"{source}: the CNN needs vocab_size and an embedding width from it")
    return cls(
      vocab_size=hf["vocab_size"], pad_token_id=hf.get("pad_token_id", 0) or 0, embedding_dim=width
    )

  @classmethod
  def tiny(cls, **kwargs: Any) -> CnnConfig:
    """A 128-word, 16-wide CNN with 4 filters per width, for tests."""
    return cls(**{**dict(vocab_size=128, embedding_dim=16, filters=4), **kwargs})


class CnnEncoder(nn.Module):
  """Embeddings -> convolutions -> ReLU -> masked max over time, with the encoder interface.

  Returns ``{'hidden_states': [B, T, F], 'pooled': [B, F]}`` (F = filters x widths): the
  per-position feature maps (zero at padding) and their max over time, which a 'pooler' head
  reads. ``token_type_ids``, ``deterministic``, ``first_token_only`` and ``remat`` are accepted
  for the interface and have nothing to act on (the head holds the dropout).
  """

  config: CnnConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    *,
    deterministic: bool = True,
    first_token_only: bool = False,
  ) -> dict[str, Array]:
    del token_type_ids, deterministic, first_token_only
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    scale = cfg.embedding_init_scale
    table = nn.Embed(
      cfg.vocab_size,
      cfg.embedding_dim,
      embedding_init=lambda k, s, d: jax.random.uniform(k, s, d, -scale, scale),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="word_embeddings",
    )
    mask = attention_mask[..., None].astype(self.dtype)
    x = table(input_ids) * mask
    maps = [
      nn.Conv(
        cfg.filters,
        (width,),
        padding="SAME",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"conv_{width}",
      )(x)
      for width in cfg.widths
    ]
    hidden = jax.nn.relu(jnp.concatenate(maps, axis=-1)) * mask
    return {"hidden_states": hidden, "pooled": jnp.max(hidden, axis=1)}


FAMILY = Family(
  name="cnn",
  config_type=CnnConfig,
  encoder=CnnEncoder,
  from_hf=CnnConfig.from_hf,
  graft_rules=GRAFT_RULES,
  tiny=CnnConfig.tiny,
)

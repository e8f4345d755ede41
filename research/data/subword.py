"""Subword vocabularies trained on a data set's training split (byte-level BPE, ``tokenizers``).

Why: a pretrained encoder's tokenizer may lowercase and strip accents (all-MiniLM-L6-v2's
uncased WordPiece turns "Mädchen" into "madchen"), and a decoder that writes with it can never
produce cased German. Translation is scored on cased, detokenised text (sacreBLEU), so the
target side gets a vocabulary of its own, learnt from the training text only (never from the
evaluation splits).

The vocabulary is byte-level BPE with GPT-2's pre-tokenisation and no normaliser at all: no
lowercasing, no accent stripping, no Unicode normalisation. Every byte is in the alphabet, so
nothing is ever unknown and ``decode(encode(text)) == text`` for any text (tested on a German
sentence with umlauts). Special tokens ``<pad> <s> </s> <unk>`` take ids 0-3; the
post-processor appends ``</s>`` when a text is encoded with special tokens (what an encoder
reading this vocabulary gets), and adds nothing without them (what the seq2seq kind does for
targets, before its own BOS/EOS).

Training is deterministic: the same texts and settings give the same ``tokenizer.json`` bytes
(tokenizers' BPE trainer breaks ties by pair order; tested). It is cached, in memory and as
``<data_dir>/vocab/<name>-<key>.json``, under a key made of the sha256 digests of the data
set's raw files (catalog sets: their name and example count), the split, the columns and the
settings, plus the ``tokenizers`` version. A run keeps its own copy of the file (the seq2seq
kind writes it into the run directory), so a cleared cache or a new library version never
changes the vocabulary of a run that exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from research.data import sources

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
# Bump when the trained file changes for the same inputs (pre-tokenisation, post-processor).
FORMAT_VERSION = 1
# The smallest useful size: the 256 byte symbols and the special tokens.
MIN_SIZE = 256 + len(SPECIAL_TOKENS)

_MEMORY: dict[str, str] = {}
_LOCK = threading.Lock()


def train_bpe(texts: Iterable[str], size: int, min_frequency: int = 2) -> str:
  """A byte-level BPE tokenizer trained on ``texts``, as ``tokenizer.json`` text.

  Args:
    texts: the training sentences, in a fixed order (the result depends only on them).
    size: the vocabulary size, special tokens and the 256 byte symbols included; an upper
      bound (a small corpus may run out of pairs to merge first).
    min_frequency: a pair is merged only if it occurs at least this often.

  Raises:
    ValueError: ``size`` below :data:`MIN_SIZE`.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  if size < MIN_SIZE:
    raise ValueError(f"vocab size {size} < {MIN_SIZE} (256 byte symbols + special tokens)")
  tok = Tokenizer(models.BPE())
  # add_prefix_space=False: no space is invented in front of a sentence, so decoding is exact.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=size,
    min_frequency=min_frequency,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  eos = tok.token_to_id(EOS)
  tok.post_processor = processors.TemplateProcessing(
    single=f"$A:0 {EOS}:0", pair=f"$A:0 {EOS}:0 $B:1 {EOS}:1", special_tokens=[(EOS, eos)]
  )
  return tok.to_str()


def from_json(text: str) -> Any:
  """A fast ``transformers`` tokenizer over ``tokenizer.json`` text from :func:`train_bpe`."""
  import transformers
  from tokenizers import Tokenizer

  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer.from_str(text),
    pad_token=PAD,
    bos_token=BOS,
    eos_token=EOS,
    unk_token=UNK,
  )


def cache_key(
  parts: Sequence[tuple[ml_collections.ConfigDict, Any, Sequence[str]]],
  size: int,
  min_frequency: int,
) -> str:
  """The cache key of a vocabulary over ``(data_cfg, builder, columns)`` parts and settings.

  The data are identified by the digests of their raw files (not by paths), so a copy of the
  same files elsewhere reuses the vocabulary and an edited file does not.
  """
  import tokenizers

  fields = dict(
    format=FORMAT_VERSION,
    tokenizers=tokenizers.__version__,
    size=size,
    min_frequency=min_frequency,
    data=[
      dict(
        tfds=builder.info.full_name,
        inputs=dict(builder.info.metadata or {}).get("inputs"),
        split=data_cfg.splits.train,
        examples=_num_examples(builder, data_cfg.splits.train),
        columns=list(columns),
      )
      for data_cfg, builder, columns in parts
    ],
  )
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _num_examples(builder: Any, split: str) -> int:
  splits = builder.info.splits
  name = sources.split_name(split)
  return int(splits[name].num_examples) if name in list(splits.keys()) else -1


def trained(
  parts: Sequence[tuple[ml_collections.ConfigDict, Sequence[str]]],
  size: int,
  min_frequency: int = 2,
) -> str:
  """The vocabulary trained on the training split (``data_cfg.splits.train``) of each data set.

  Args:
    parts: ``(data_cfg, columns)`` pairs: which text features of which data set to learn from
      (e.g. ``[(multi30k, ['de'])]`` for a target vocabulary, ``['en', 'de']`` for a joint
      one). Texts are read column by column, in data order.
    size, min_frequency: as in :func:`train_bpe`.

  Returns:
    ``tokenizer.json`` text, from the cache when the same data and settings were seen before.
  """
  opened = []
  for data_cfg, columns in parts:
    builder = sources.get_builder(data_cfg)
    sources.check_split(builder, data_cfg.splits.train)
    opened.append((data_cfg, builder, columns))
  key = cache_key(opened, size, min_frequency)
  # Only prepared data are cached: a mocked data set is not on disk and may change.
  cacheable = all(sources.is_prepared(b) for _, b, _ in opened)
  with _LOCK:
    if cacheable and key in _MEMORY:
      return _MEMORY[key]
  first = opened[0][0]
  path = sources.data_dir(first) / "vocab" / f"{first.name}-{key}.json"
  if cacheable and path.is_file():
    text = path.read_text(encoding="utf-8")
  else:
    texts: list[str] = []
    for data_cfg, builder, columns in opened:
      cols = sources.read_columns(builder, data_cfg.splits.train, list(columns))
      for c in columns:
        texts.extend(cols[c])
    text = train_bpe(texts, size, min_frequency)
    if cacheable:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
      tmp.write_text(text, encoding="utf-8")
      os.replace(tmp, path)  # Atomic: processes training the same vocabulary race harmlessly.
  if cacheable:
    with _LOCK:
      _MEMORY[key] = text
  return text

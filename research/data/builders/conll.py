"""tfds builder for CoNLL column files (named-entity recognition).

One token per line, columns separated by single spaces, a blank line between sentences,
``-DOCSTART-`` lines between documents (skipped, like the tfds catalog's ``conll2003``). The
word is in ``word_column`` and the tag in ``tag_column``; tags may be IOB1, IOB2 or BIOES
(``scheme``) and are stored as IOB2 ids in the order ``O, B-T, I-T`` per entity type, the same
names as the catalog ``conll2003`` so one pipeline serves both.

Features: ``{"tokens": Sequence(Text), "ner": Sequence(ClassLabel)}``; sentences keep file
order. A line with the wrong number of columns or an unknown tag raises
:class:`~research.data.builders.common.InputError` naming ``file:line``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from research.data import tags
from research.data.builders import common
from research.data.builders.common import InputError

_TYPES = ("PER", "ORG", "LOC", "MISC")


@dataclasses.dataclass(eq=False)
class ConllConfig(common.LocalFilesConfig):
  """Config of :class:`LocalConll`.

  Attributes:
    columns: names of the columns of a token line (their count is enforced).
    word_column, tag_column: indices into ``columns``.
    scheme: tag scheme of the files (``'iob1'``, ``'iob2'`` or ``'bioes'``).
    entity_types: entity types, in label order.
  """

  columns: tuple[str, ...] = ("word", "POS", "chunk", "NER")
  word_column: int = 0
  tag_column: int = -1
  scheme: str = "iob2"
  entity_types: tuple[str, ...] = _TYPES


CONFIGS = [
  ConllConfig(
    name="conll2003",
    description="CoNLL-2003 English NER (IOB2); -DOCSTART- lines skipped.",
    files={"train": "train.txt", "dev": "valid.txt", "test": "test.txt"},
    sha256={
      "train.txt": "f83974d1808bb6699ff06d36f0236cf66fce5be1c2b6bd5111ff8f7e9fc71c8d",
      "valid.txt": "98e27eee97edde022caaa568cc46232261ea6722a2132de70b1e1e7971690fdd",
    },
  ),
  ConllConfig(
    name="conll2002_es",
    description="CoNLL-2002 Spanish NER (IOB2, latin-1); dev = esp.testa.",
    files={"train": "esp.train", "dev": "esp.testa", "test": "esp.testb"},
    sha256={
      "esp.train": "ec4eea28449f2503fab38009e66a25708aaf2aba9368382a4c112f1e3ba86c21",
      "esp.testa": "cdbef0e0338d55bd5166bef07cb65192c0f7d35a846417bb9f6b1f1298b9b7e8",
    },
    encoding="latin-1",
    columns=("word", "POS", "NER"),
  ),
]


def sentences(path: Path, cfg: ConllConfig) -> Iterator[tuple[list[str], list[str]]]:
  """``(words, IOB2 tags)`` per sentence of a CoNLL file, validating every line.

  Raises:
    InputError: on a wrong column count, an unknown tag, or a file without sentences.
  """
  words: list[str] = []
  raw_tags: list[str] = []
  count = 0

  def flush() -> Iterator[tuple[list[str], list[str]]]:
    nonlocal count
    if words:
      count += 1
      yield list(words), tags.to_iob2(raw_tags, cfg.scheme)
      words.clear()
      raw_tags.clear()

  width = len(cfg.columns)
  for lineno, line in common.read_lines(path, cfg.encoding):
    line = line.rstrip()
    if not line or line.startswith("-DOCSTART-"):
      yield from flush()
      continue
    cols = line.split(" ")
    if len(cols) != width:
      raise InputError(
        path,
        lineno,
        f"expected {width} space-separated columns ({' '.join(cfg.columns)}), found "
        f"{len(cols)}: {line!r}.",
      )
    tag = cols[cfg.tag_column]
    problem = tags.check_tag(tag, cfg.scheme, cfg.entity_types)
    if problem:
      raise InputError(path, lineno, f"unknown tag {tag!r}; expected {problem} ({cfg.scheme}).")
    words.append(cols[cfg.word_column])
    raw_tags.append(tag)
  yield from flush()
  if count == 0:
    raise InputError(path, None, "no sentences; expected token lines separated by blank lines.")


class LocalConll(common.LocalFilesBuilder):
  """NER from local CoNLL column files (see module docstring)."""

  BUILDER_CONFIGS = CONFIGS

  def _features(self) -> tfds.features.FeaturesDict:
    names = tags.tag_names(self.builder_config.entity_types, "iob2")
    return tfds.features.FeaturesDict(
      {
        "tokens": tfds.features.Sequence(tfds.features.Text()),
        "ner": tfds.features.Sequence(tfds.features.ClassLabel(names=names)),
      }
    )

  def _generate_examples(self, split: str, spec: Any, manual_dir: Path):
    for i, (words, iob2) in enumerate(sentences(manual_dir / spec, self.builder_config)):
      yield i, {"tokens": words, "ner": iob2}

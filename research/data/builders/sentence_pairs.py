"""tfds builder for sentence-pair data sets from local TSV files (STS-B, MRPC).

Features: ``{"text": Text, "text_pair": Text, "label": ...}`` where the label is a float score
(``label_names`` empty: regression, e.g. STS-B's 0-5 similarity) or a ClassLabel over
``label_names`` (e.g. MRPC's paraphrase / not). Examples keep file order. A split's file spec::

  {"file": "sts-train.csv", "header": False, "text": 5, "text_pair": 6, "label": 4,
   "min_columns": 7, "max_columns": 9}

Columns are 0-based indices (or names, with a header). Rows are split on tabs without quoting:
STS-B and MRPC sentences contain bare quotes. STS-B rows may carry two trailing source columns,
hence a column-count range. A row with too few or too many columns, an empty sentence, a score
that is not a number or outside ``score_range``, or an unknown label raises
:class:`~research.data.builders.common.InputError` naming ``file:line``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from research.data.builders import common
from research.data.builders.common import InputError


@dataclasses.dataclass(eq=False)
class SentencePairConfig(common.LocalFilesConfig):
  """Config of :class:`LocalSentencePairs`.

  Attributes:
    label_names: class names (label id = index); empty for a float score.
    score_range: ``(low, high)`` bounds of a float score, checked on every row.
  """

  label_names: tuple[str, ...] = ()
  score_range: tuple[float, float] = (-math.inf, math.inf)


_STSB = dict(header=False, text=5, text_pair=6, label=4, min_columns=7, max_columns=9)
_MRPC = dict(header=True, text="#1 String", text_pair="#2 String", label="Quality")

CONFIGS = [
  SentencePairConfig(
    name="stsb",
    description="STS Benchmark (GLUE STS-B): sentence pairs scored 0-5 for similarity.",
    files={
      "train": {"file": "sts-train.csv", **_STSB},
      "validation": {"file": "sts-dev.csv", **_STSB},
      "test": {"file": "sts-test.csv", **_STSB},
    },
    sha256={
      "sts-train.csv": "d52e1db23c2483099f2ff4d9cd80a0f98be6438748b65e21f2f2244da0164ab1",
      "sts-dev.csv": "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234",
    },
    score_range=(0.0, 5.0),
  ),
  SentencePairConfig(
    name="mrpc",
    description="MRPC (GLUE): is sentence 2 a paraphrase of sentence 1? (0 / 1).",
    files={
      "train": {"file": "train.tsv", **_MRPC},
      "validation": {"file": "dev.tsv", **_MRPC},
      "test": {"file": "test.tsv", **_MRPC},
    },
    sha256={
      "train.tsv": "15d9c71e62d662b1cc9237e2015047cad4c1f62552d49858a9bce2b944d79897",
      "dev.tsv": "320459df9454dbdc8eea69ad1eb294967e7dfe03e7cf791f37d954a316f5253d",
    },
    label_names=("not_paraphrase", "paraphrase"),
  ),
]


def _column(spec: Any, header: list[str] | None, path: Path) -> int:
  if isinstance(spec, int):
    return spec
  if header is None:
    raise ValueError(f"{path}: column {spec!r} given by name but the spec says header=False.")
  if spec not in header:
    raise InputError(path, 1, f"header {header} has no column {spec!r}.")
  return header.index(spec)


def _label(raw: str, config: SentencePairConfig, path: Path, lineno: int) -> Any:
  """The row's label: a class name, or a float score within ``config.score_range``."""
  if config.label_names:
    if raw.isdigit() and int(raw) < len(config.label_names):
      return config.label_names[int(raw)]
    if raw in config.label_names:
      return raw
    expected = [str(i) for i in range(len(config.label_names))]
    raise InputError(path, lineno, f"unknown label {raw!r}; expected one of {expected}.")
  try:
    score = float(raw)
  except ValueError:
    raise InputError(path, lineno, f"score {raw!r} is not a number.") from None
  low, high = config.score_range
  if not low <= score <= high:
    raise InputError(path, lineno, f"score {score} outside [{low}, {high}].")
  return np.float32(score)


def generate(
  path: Path, spec: dict[str, Any], config: SentencePairConfig
) -> Iterator[tuple[int, dict[str, Any]]]:
  """Examples ``(row index, {"text", "text_pair", "label"})`` of one file, row by row checked.

  Raises:
    InputError: see the module docstring.
  """
  lines = ((n, line) for n, line in common.read_lines(path, config.encoding) if line.strip())
  header = None
  if spec.get("header", False):
    first = next(lines, None)
    if first is None:
      raise InputError(path, None, "blank file; expected a header line.")
    header = [h.strip() for h in first[1].split("\t")]
  cols = {k: _column(spec[k], header, path) for k in ("text", "text_pair", "label")}
  low = spec.get("min_columns", len(header) if header else max(cols.values()) + 1)
  high = spec.get("max_columns", low)
  index = 0
  for lineno, line in lines:
    row = line.split("\t")
    if not low <= len(row) <= high:
      want = f"{low}" if low == high else f"{low} to {high}"
      names = f" ({', '.join(header)})" if header else ""
      raise InputError(
        path, lineno, f"expected {want} tab-separated columns{names}, found {len(row)}."
      )
    example = {k: row[cols[k]].strip() for k in ("text", "text_pair")}
    for k, text in example.items():
      if not text:
        raise InputError(path, lineno, f"empty {k} (column {cols[k] + 1}); expected a sentence.")
    example["label"] = _label(row[cols["label"]].strip(), config, path, lineno)
    yield index, example
    index += 1
  if index == 0:
    raise InputError(path, None, "no examples; expected at least one sentence pair.")


class LocalSentencePairs(common.LocalFilesBuilder):
  """Sentence pairs with a class label or a float score (see module docstring)."""

  BUILDER_CONFIGS = CONFIGS

  def _features(self) -> tfds.features.FeaturesDict:
    names = list(self.builder_config.label_names)
    label = tfds.features.ClassLabel(names=names) if names else tfds.features.Scalar(np.float32)
    return tfds.features.FeaturesDict(
      {"text": tfds.features.Text(), "text_pair": tfds.features.Text(), "label": label}
    )

  def _generate_examples(self, split: str, spec: dict[str, Any], manual_dir: Path):
    yield from generate(manual_dir / spec["file"], spec, self.builder_config)

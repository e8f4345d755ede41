"""tfds builder for text classification from local TSV / CSV files (SST-2 style).

Features: ``{"text": Text, "label": ClassLabel(label_names)}``; examples keep file order.
Each split's file spec says how to read it::

  {"file": "train.tsv", "format": "tsv", "header": True,
   "text": "sentence",      # column name (with a header) or 0-based index; a tuple is joined by " "
   "label": "label",        # likewise
   "label_map": {"0": "negative", "1": "positive"}}  # raw value -> class name (optional)

TSV is split on tabs without quoting (GLUE files contain bare quotes); CSV uses the csv module.
Every row must have exactly the header's (or the first row's) number of columns, every label must
be known; otherwise :class:`~research.data.builders.common.InputError` names ``file:line``.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from research.data.builders import common
from research.data.builders.common import InputError

_SST2_LABELS = {"0": "negative", "1": "positive"}
_SENTIMENT = ("negative", "positive")
_AG_NEWS = ("World", "Sports", "Business", "Sci/Tech")


@dataclasses.dataclass(eq=False)
class TextClassificationConfig(common.LocalFilesConfig):
  """Config of :class:`LocalTextClassification`; ``label_names`` fixes the class ids."""

  label_names: tuple[str, ...] = ()


def _uci(file: str, sha: str) -> TextClassificationConfig:
  name = file.split("_")[0]
  return TextClassificationConfig(
    name=f"sentiment_{name}",
    description=f"UCI Sentiment Labelled Sentences, {name} domain (1,000 sentences).",
    files={
      "test": {
        "file": file,
        "format": "tsv",
        "header": True,
        "text": "reviews",
        "label": "sentiment",
        "label_map": _SST2_LABELS,
      }
    },
    sha256={file: sha},
    label_names=_SENTIMENT,
  )


CONFIGS = [
  TextClassificationConfig(
    name="sst2",
    description="GLUE SST-2 from local TSV files; the unlabelled GLUE test split is omitted.",
    files={
      split: {
        "file": file,
        "format": "tsv",
        "header": True,
        "text": "sentence",
        "label": "label",
        "label_map": _SST2_LABELS,
      }
      for split, file in (("train", "train.tsv"), ("validation", "dev.tsv"))
    },
    sha256={
      "train.tsv": "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2",
      "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    },
    label_names=_SENTIMENT,
  ),
  TextClassificationConfig(
    name="ag_news",
    description=(
      "AG News: the original test.csv (7,600) and a 10,001-row train subset (ALPS dev.tsv);"
      " text is the description only in both splits, so they match."
    ),
    files={
      "train": {
        "file": "train_subset10k_alps.tsv",
        "format": "tsv",
        "header": False,
        "text": 0,
        "label": 1,
      },
      "test": {
        "file": "test.csv",
        "format": "csv",
        "header": False,
        "text": 2,
        "label": 0,
        "label_map": {str(i + 1): n for i, n in enumerate(_AG_NEWS)},
      },
    },
    sha256={
      "test.csv": "d2a2cef4dfeb21ca17b463fd15e9e5a639c05823d03efabb3d28a75bbfe8d915",
      "train_subset10k_alps.tsv": (
        "7a0811e0006080bf4de17752c5466450ff3db778be71bc5bcf3c4e99b5f0803d"
      ),
    },
    label_names=_AG_NEWS,
  ),
  _uci(
    "amazon_cells_labelled.txt",
    "ca1d53aae8154b3c17ce1166167e545ccdc910cc0aa5c885c1adf9ce161a4648",
  ),
  _uci("imdb_labelled.txt", "2fa2807a9da06b5058999c430b2857ff2419b45bcfc35acfc192bd955f85577f"),
  _uci("yelp_labelled.txt", "f79668aea211c92320d13e863a3161948f19ff03b7447869b40e32d1c9970f0e"),
]


def _rows(path: Path, fmt: str, encoding: str) -> Iterator[tuple[int, list[str]]]:
  """``(line number, columns)`` of every non-blank row."""
  if fmt == "tsv":
    for lineno, line in common.read_lines(path, encoding):
      if line.strip():
        yield lineno, line.split("\t")
  elif fmt == "csv":
    empty = True
    # Lines decoded one by one, so a bad byte is reported at its own line (common.decoded_lines).
    reader = csv.reader(line for _, line in common.decoded_lines(path, encoding))
    for row in reader:
      empty = False
      if any(cell.strip() for cell in row):
        yield reader.line_num, row
    if empty:
      raise InputError(path, None, "empty file; expected at least one example.")
  else:
    raise ValueError(f"Unknown format {fmt!r} for {path}; expected 'tsv' or 'csv'.")


def _column(spec: Any, header: list[str] | None, path: Path) -> int:
  if isinstance(spec, int):
    return spec
  if header is None:
    raise ValueError(f"{path}: column {spec!r} given by name but the spec says header=False.")
  if spec not in header:
    raise InputError(path, 1, f"header {header} has no column {spec!r}.")
  return header.index(spec)


def generate(
  path: Path, spec: dict[str, Any], label_names: tuple[str, ...], encoding: str
) -> Iterator[tuple[int, dict[str, Any]]]:
  """Examples ``(row index, {"text", "label"})`` of one file, validating every row.

  Raises:
    InputError: on a missing or extra column, an unknown label value, empty text or file.
  """
  rows = _rows(path, spec.get("format", "tsv"), encoding)
  header = None
  if spec.get("header", False):
    first = next(rows, None)
    if first is None:
      raise InputError(path, None, "blank file; expected a header line.")
    header = [h.strip() for h in first[1]]
  text_specs = spec["text"] if isinstance(spec["text"], (list, tuple)) else (spec["text"],)
  text_cols = [_column(c, header, path) for c in text_specs]
  label_col = _column(spec["label"], header, path)
  label_map = dict(spec.get("label_map") or {})
  known = set(label_names)
  width = len(header) if header is not None else None
  index = 0
  for lineno, cols in rows:
    width = width if width is not None else len(cols)
    if len(cols) != width:
      sep = "tab" if spec.get("format", "tsv") == "tsv" else "comma"
      names = f" ({', '.join(header)})" if header else ""
      raise InputError(
        path, lineno, f"expected {width} {sep}-separated columns{names}, found {len(cols)}."
      )
    raw = cols[label_col].strip()
    label = label_map.get(raw, raw) if label_map else raw
    if label not in known:
      expected = sorted(label_map) if label_map else sorted(known)
      raise InputError(path, lineno, f"unknown label {raw!r}; expected one of {expected}.")
    text = " ".join(cols[c].strip() for c in text_cols).strip()
    if not text:
      raise InputError(path, lineno, "empty text; expected a sentence.")
    yield index, {"text": text, "label": label}
    index += 1
  if index == 0:
    raise InputError(path, None, "no examples; expected at least one row after the header.")


class LocalTextClassification(common.LocalFilesBuilder):
  """Text classification from local TSV / CSV files (see module docstring)."""

  BUILDER_CONFIGS = CONFIGS

  def _features(self) -> tfds.features.FeaturesDict:
    names = list(self.builder_config.label_names)
    return tfds.features.FeaturesDict(
      {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=names)}
    )

  def _generate_examples(self, split: str, spec: dict[str, Any], manual_dir: Path):
    cfg = self.builder_config
    yield from generate(manual_dir / spec["file"], spec, cfg.label_names, cfg.encoding)

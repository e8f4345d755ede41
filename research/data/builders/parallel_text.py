"""tfds builder for line-aligned parallel text: one file per language side, plain or ``.gz``.

Line i of every side's file is one sentence pair (Multi30k layout). Features: ``{lang: Text}``
for each language, as in the catalog's ``wmt*_translate``; pairs keep file order. A split whose
files are absent is not produced: Multi30k's ``test`` split (``test_2016_flickr.{en,de}.gz``,
not distributed with the shared data) appears once its files are put beside the others
(tested with tests/fixtures/data/multi30k_test2016). Files of a split with different line
counts, or an empty sentence, raise :class:`~research.data.builders.common.InputError` naming
``file:line``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from research.data.builders import common
from research.data.builders.common import InputError


@dataclasses.dataclass(eq=False)
class ParallelTextConfig(common.LocalFilesConfig):
  """Config of :class:`LocalParallelText`: ``files`` maps split -> {language: file name}."""

  languages: tuple[str, ...] = ("en", "de")


CONFIGS = [
  ParallelTextConfig(
    name="multi30k_en_de",
    description="Multi30k (WMT16 multimodal task 1) English-German, raw cased text.",
    files={
      "train": {"en": "train.en.gz", "de": "train.de.gz"},
      "validation": {"en": "val.en.gz", "de": "val.de.gz"},
      "test": {"en": "test_2016_flickr.en.gz", "de": "test_2016_flickr.de.gz"},
    },
    sha256={
      "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
      "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
      "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
      "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    },
    languages=("en", "de"),
  ),
]


def pairs(
  manual_dir: Path, files: dict[str, str], languages: tuple[str, ...], encoding: str
) -> Iterator[dict[str, str]]:
  """``{lang: sentence}`` per aligned line of the split's files.

  Raises:
    InputError: on an empty file or line, or files of different lengths.
  """
  if set(files) != set(languages):
    raise ValueError(f"Split files {sorted(files)} do not match languages {list(languages)}.")
  readers = {lang: common.read_lines(manual_dir / files[lang], encoding) for lang in languages}
  lineno = 0
  while True:
    rows = {lang: next(reader, None) for lang, reader in readers.items()}
    done = [lang for lang, row in rows.items() if row is None]
    if done:
      if len(done) != len(languages):
        longer = next(lang for lang in languages if lang not in done)
        short = done[0]
        raise InputError(
          manual_dir / files[longer],
          lineno + 1,
          f"has more lines than {files[short]} ({lineno}); expected line-aligned files.",
        )
      return
    lineno += 1
    example = {}
    for lang, (_, text) in rows.items():
      text = text.strip()
      if not text:
        raise InputError(manual_dir / files[lang], lineno, "empty sentence; expected text.")
      example[lang] = text
    yield example


class LocalParallelText(common.LocalFilesBuilder):
  """Translation pairs from local line-aligned files (see module docstring)."""

  BUILDER_CONFIGS = CONFIGS

  def _features(self) -> tfds.features.FeaturesDict:
    langs = self.builder_config.languages
    return tfds.features.FeaturesDict({lang: tfds.features.Text() for lang in langs})

  def _generate_examples(self, split: str, spec: dict[str, str], manual_dir: Path):
    cfg = self.builder_config
    yield from enumerate(pairs(manual_dir, spec, cfg.languages, cfg.encoding))

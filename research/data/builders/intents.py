"""tfds builder for intent classification from JSON: ProtAugment JSON Lines or CLINC150 JSON.

Formats (per split file spec):

- ``jsonl`` (BANKING77 / CLINC150 as published by ProtAugment): one ``{"sentence": ...,
  "label": ...}`` object per line; the spec is the file name.
- ``clinc_json`` (CLINC150's ``data_full.json``): ``{"train": [[text, label], ...], "val": ...}``;
  the spec is ``{"file": "data_full.json", "key": "train"}``.

Features: ``{"text": Text, "label": ClassLabel}`` with the class names (sorted) collected over
all splits at preparation. The published few-shot class splits (``few_shot/NN/labels.{train,
valid,test}.txt``: meta-train / meta-valid / meta-test classes) are checked (known classes,
disjoint) and stored in ``info.metadata["class_splits"][run][split]`` for the episode sampler.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from research.data.builders import common
from research.data.builders.common import InputError

CLASS_SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(eq=False)
class IntentConfig(common.LocalFilesConfig):
  """Config of :class:`LocalIntents`.

  Attributes:
    format: ``'jsonl'`` or ``'clinc_json'`` (see module docstring).
    text_field, label_field: keys of a JSON Lines object.
    class_split_files: class split file pattern under the manual dir, ``{run}`` and ``{split}``
      filled from ``few_shot/*/`` and :data:`CLASS_SPLITS`; ``''`` = none.
  """

  format: str = "jsonl"
  text_field: str = "sentence"
  label_field: str = "label"
  class_split_files: str = "few_shot/{run}/labels.{split}.txt"


def _sha_table(text: str) -> dict[str, str]:
  return dict(line.split() for line in text.strip().splitlines())


_BANKING77_SHA = _sha_table("""
full.jsonl 2aef59a59888b66ebfd99a08e82a18f396a81c0430410938ef416a4bd5081b98
few_shot/01/labels.test.txt 49f28d5d8407026f65e8695f6ed4f5197f8bc01d472b409b13c05e001fa1cff3
few_shot/01/labels.train.txt 24c65da022d4b08284576a486b40184ee289ce743adf31cfcb4f455c57d4d2a6
few_shot/01/labels.valid.txt bd16328f26fb6ddb3b1ca5b2d4c851bdf241efd5655ff42757bda4db528d60b3
few_shot/02/labels.test.txt b4e88a349d35188ab969cb58d774528574403f8e8545761c366f9a17a934c644
few_shot/02/labels.train.txt 9f46fe71d7458846d12332f6d5ca08ab90fea22ba265c0cd764979e20bcd8657
few_shot/02/labels.valid.txt 3ccedcdeec8edfc30f87f70dab84e4c9d6f61276cca514c29a2796569de10409
few_shot/03/labels.test.txt 6e9a900c934ffbf099708fb02ccae92dce027c7ab6c4867668aee2b070307cf5
few_shot/03/labels.train.txt e4c304f1e05b5c103d77e584501af0c89399bebc3488eca6e213c4c205113ee3
few_shot/03/labels.valid.txt 5a7de8fb72c7091672930f26a0bca15596577950ce4e4425db1de4fea336f0d8
few_shot/04/labels.test.txt cc33a69762dcbb6b600843771a3c4167096cc9ae4bfdfa4a8827cc2e8e9cac79
few_shot/04/labels.train.txt 2babffff35ec25c9385b51122fcd90f39d86fbd457e43e0b4bdd275d2e2e0178
few_shot/04/labels.valid.txt 15528effc2dd837e4f29b73219ee34ca45b688252d36c495c70fb26d246d6972
few_shot/05/labels.test.txt 2a00100b5fa1131a1c573489be6bc268fe49c00d8e090d1dea450cf3d56f7ff3
few_shot/05/labels.train.txt 21c00659254cd525e1f21ce775b17da1823471d4870cfdec5860e050bb3c696e
few_shot/05/labels.valid.txt c6b96cd2c97427e48ca9447851767006a6c82ee9028689f9c6e925e79e24341e
""")

_CLINC150_SHA = _sha_table("""
full.jsonl ae5573aa7fada6614862657b0d6aabcd9f33135f56c8cd8dd4aefab6bc8ccd26
few_shot/01/labels.test.txt 2e15b8d0bcca648a3e548021397b5d8ae7a470d7d6547bb8f937d01e32359e7e
few_shot/01/labels.train.txt 09d3937c82290d220fd8e7d7c869b67d925a8b553152a038d0bd5951433ddd61
few_shot/01/labels.valid.txt 67e16b89a8ea860ad2f614ddcfcfda4bda9b62fd567fda979a203e09b08a5b75
few_shot/02/labels.test.txt 0294cb823c614db59c17a1158d94cf219fc7f3ede7d198aef57e0f4287819ae1
few_shot/02/labels.train.txt 0fe33ab45d013ce1ecbc5acc812d87ec2418f64e02f0febd7bf6b3840491b5a7
few_shot/02/labels.valid.txt 1ff86a05de17dadbbba01471638c36de52a62b268b7387c1642d840439e96e07
few_shot/03/labels.test.txt 60a0db222f9f874ba73b1ea738af7a8e33d208ec1ea6e1a5356f27f88e8286e4
few_shot/03/labels.train.txt 4ac4510e248f0ddce70f0e0cdd7ad96bad4bd5298520ba8f239ebae0243795c6
few_shot/03/labels.valid.txt e69114220b66edf6a9456b4fbe69c901e797eb08b18abe49e85622a45b730cfe
few_shot/04/labels.test.txt 0bcfc4eea6844dcb0cb93065dff0555f34d99d33dea372a8c9bedd734ad41184
few_shot/04/labels.train.txt fc0d816b030f1b164a5b3e551dc9aaeb9310b72245c7a4f0648e73497facf574
few_shot/04/labels.valid.txt cdfadb9dcd5a96a3c82093848a9dd538ab84a3f85ba4f885a3f0e7ed2059cc16
few_shot/05/labels.test.txt 5c51ecfb7cd468cbc68a788e58136c70f135681dab70c6c03f3288220dd3c77e
few_shot/05/labels.train.txt 27e241d0bf313a6f891c1e2130aef7b70cee965151c9bca0a997c5fcef5589fc
few_shot/05/labels.valid.txt b300674c816e00418c6d1437bded0e6d99bbe01a66a2a82f205fe1e10098c21b
""")

CONFIGS = [
  IntentConfig(
    name="banking77",
    description="BANKING77 (all 13,083 examples) with ProtAugment's 5 class splits.",
    files={"full": "full.jsonl"},
    sha256=_BANKING77_SHA,
  ),
  IntentConfig(
    name="clinc150",
    description="CLINC150 in-scope (22,500 examples) with ProtAugment's 5 class splits.",
    files={"full": "full.jsonl"},
    sha256=_CLINC150_SHA,
  ),
  IntentConfig(
    name="clinc150_full_json",
    description="CLINC150 from the original data_full.json (in-scope train/val/test).",
    files={
      split: {"file": "data_full.json", "key": key}
      for split, key in (("train", "train"), ("validation", "val"), ("test", "test"))
    },
    format="clinc_json",
    class_split_files="",
  ),
]


def _jsonl(path: Path, cfg: IntentConfig) -> Iterator[tuple[str, str]]:
  expected = f'{{"{cfg.text_field}": ..., "{cfg.label_field}": ...}}'
  for lineno, line in common.read_lines(path, cfg.encoding):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(path, lineno, f"invalid JSON ({e.msg}); expected {expected}.") from e
    if not isinstance(obj, dict):
      raise InputError(
        path, lineno, f"expected a JSON object {expected}, got {type(obj).__name__}."
      )
    for key in (cfg.text_field, cfg.label_field):
      if not isinstance(obj.get(key), str) or not obj[key].strip():
        raise InputError(path, lineno, f"missing or empty {key!r}; expected {expected}.")
    yield obj[cfg.text_field].strip(), obj[cfg.label_field].strip()


def _clinc_json(path: Path, key: str, cfg: IntentConfig) -> Iterator[tuple[str, str]]:
  text = common.read_text(path, cfg.encoding)
  if not text.strip():
    raise InputError(path, None, "empty file; expected {split: [[text, label], ...]}.")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(path, e.lineno, f"invalid JSON ({e.msg}).") from e
  if key not in data:
    raise InputError(path, None, f"no key {key!r}; keys: {sorted(data)}.")
  for i, item in enumerate(data[key]):
    if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
      raise InputError(path, None, f"entry {key}[{i}] is {item!r}; expected [text, label].")
    yield item[0].strip(), item[1].strip()


def examples(manual_dir: Path, spec: Any, cfg: IntentConfig) -> Iterator[tuple[str, str]]:
  """``(text, label name)`` of one split."""
  if cfg.format == "jsonl":
    return _jsonl(manual_dir / spec, cfg)
  if cfg.format == "clinc_json":
    return _clinc_json(manual_dir / spec["file"], spec["key"], cfg)
  raise ValueError(f"Unknown intent format {cfg.format!r}; expected 'jsonl' or 'clinc_json'.")


def _runs(manual_dir: Path, cfg: IntentConfig) -> dict[str, dict[str, Path]]:
  """``{run: {split: path}}`` of the complete class split file sets in the manual dir."""
  if not cfg.class_split_files:
    return {}
  pattern = cfg.class_split_files
  runs = sorted(p.name for p in manual_dir.glob(pattern.split("{run}")[0] + "*") if p.is_dir())
  out = {}
  for run in runs:
    paths = {s: manual_dir / pattern.format(run=run, split=s) for s in CLASS_SPLITS}
    if all(p.is_file() for p in paths.values()):
      out[run] = paths
  return out


def class_split_files(manual_dir: Path, cfg: IntentConfig) -> list[str]:
  """The class split files present (names relative to the manual dir)."""
  return [
    str(p.relative_to(manual_dir))
    for paths in _runs(manual_dir, cfg).values()
    for p in paths.values()
  ]


def read_class_splits(
  manual_dir: Path, cfg: IntentConfig, known: set[str]
) -> dict[str, dict[str, list[str]]]:
  """``{run: {split: [class names]}}`` from the class split files, validated.

  Raises:
    InputError: on an unknown class name, a duplicate, or classes shared between splits.
  """
  out: dict[str, dict[str, list[str]]] = {}
  for run, paths in _runs(manual_dir, cfg).items():
    seen: dict[str, str] = {}
    out[run] = {}
    for split, path in paths.items():
      names = []
      for lineno, line in common.read_lines(path, cfg.encoding):
        name = line.strip()
        if not name:
          continue
        if name not in known:
          raise InputError(path, lineno, f"class {name!r} has no examples in the data set.")
        if name in seen:
          raise InputError(path, lineno, f"class {name!r} is already in split {seen[name]!r}.")
        seen[name] = split
        names.append(name)
      out[run][split] = names
  return out


class LocalIntents(common.LocalFilesBuilder):
  """Intent classification from local JSON files (see module docstring)."""

  BUILDER_CONFIGS = CONFIGS

  def _features(self) -> tfds.features.FeaturesDict:
    # Class names are only known after reading the files; set in _prepare().
    return tfds.features.FeaturesDict(
      {"text": tfds.features.Text(), "label": tfds.features.ClassLabel()}
    )

  @classmethod
  def input_files(cls, config: IntentConfig, manual_dir: Path) -> list[str]:
    return sorted(super().input_files(config, manual_dir) + class_split_files(manual_dir, config))

  def _prepare(self, splits: dict[str, Any], manual_dir: Path) -> None:
    cfg = self.builder_config
    names = {label for spec in splits.values() for _, label in examples(manual_dir, spec, cfg)}
    self.info.features["label"].names = sorted(names)
    self.info.metadata["class_splits"] = read_class_splits(manual_dir, cfg, names)

  def _generate_examples(self, split: str, spec: Any, manual_dir: Path):
    for i, (text, label) in enumerate(examples(manual_dir, spec, self.builder_config)):
      yield i, {"text": text, "label": label}

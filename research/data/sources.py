"""tfds access without TensorFlow: prepare a data set as ArrayRecord and read its columns.

Local sets are built by our builders (:mod:`research.data.builders`) from the raw files in the
manual dir; catalog sets go through ``tfds.builder`` (modules such as ``glue`` register only
once imported, hence :data:`CATALOG_MODULES`). Either way the split is read by random access
from ``builder.as_data_source(split)``. Text comes back as ``bytes`` from real data and as
``str`` from ``tfds.testing.mock_data``; :func:`read_columns` returns ``str`` for both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from research import errors
from research.data import builders, locations, registry
from research.data.builders import common

# First part of a catalog name -> module whose import registers the builder.
CATALOG_MODULES = {
  "glue": "tensorflow_datasets.text.glue",
  "conll2003": "tensorflow_datasets.text.conll2003",
  "conll2002": "tensorflow_datasets.text.conll2002",
  "imdb_reviews": "tensorflow_datasets.text.imdb",
  "yelp_polarity_reviews": "tensorflow_datasets.text.yelp_polarity",
  "ag_news_subset": "tensorflow_datasets.text.ag_news_subset",
  "xnli": "tensorflow_datasets.text.xnli",
  "wmt14_translate": "tensorflow_datasets.translate.wmt14",
  "wmt16_translate": "tensorflow_datasets.translate.wmt16",
  "wmt19_translate": "tensorflow_datasets.translate.wmt19",
}

_CHUNK = 4096


def data_dir(data_cfg: ml_collections.ConfigDict) -> Path:
  """The tfds data_dir of ``data_cfg`` (its field, or the default writable location)."""
  return Path(data_cfg.data_dir).expanduser() if data_cfg.data_dir else locations.tfds_dir()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  """An exclusive advisory lock, so concurrent processes do not prepare the same set twice."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the builder's data set has been prepared in its data_dir."""
  return Path(builder.data_dir, "dataset_info.json").exists()


def verifies(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether raw files are checked against the published sha256.

  Only for the registry's own folder of the data set (relocatable with ``$RESEARCH_DATA_DIR``):
  a ``manual_dir`` override points at other files on purpose (fixtures, subsets).
  """
  default = registry.DATASETS.get(data_cfg.name, {}).get("manual_dir")
  return bool(data_cfg.verify_checksums) and data_cfg.manual_dir == default


def _local_builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Our builder for ``data_cfg``; its data_dir depends on the raw files it reads.

  The published copy is prepared under ``data_dir`` itself; any other set of raw files (a
  fixture, an edited copy) under ``data_dir/custom/<digest of its files>``, so the two are
  never mixed up and each is prepared once.
  """
  name, _, config = data_cfg.tfds_name.partition("/")
  cls = builders.BUILDERS.get(name)
  if cls is None:
    raise KeyError(f"No local builder {name!r}; known: {sorted(builders.BUILDERS)}.")
  if config not in cls.builder_configs:
    raise KeyError(f"{name} has no config {config!r}; known: {sorted(cls.builder_configs)}.")
  builder_cfg = cls.builder_configs[config]
  manual_dir = locations.resolve_manual_dir(data_cfg.manual_dir)
  digests = common.verify_inputs(
    builder_cfg, manual_dir, cls.input_files(builder_cfg, manual_dir), verifies(data_cfg)
  )
  published = bool(builder_cfg.sha256) and all(
    builder_cfg.sha256.get(n) == d for n, d in digests.items()
  )
  root = data_dir(data_cfg)
  if not published:
    tag = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:12]
    root = root / "custom" / tag
  kwargs = dict(data_dir=str(root), file_format="array_record")
  return cls(config=config, verify_checksums=verifies(data_cfg), **kwargs)


def _catalog_builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  base = data_cfg.tfds_name.split("/")[0].split(":")[0]
  if base in CATALOG_MODULES:
    importlib.import_module(CATALOG_MODULES[base])
  return tfds.builder(
    data_cfg.tfds_name, data_dir=str(data_dir(data_cfg)), file_format="array_record"
  )


def _bars_only_on_a_terminal() -> None:
  """Turns tfds' progress bars off unless stderr is a terminal.

  They redraw with carriage returns and cursor moves and end without a newline: in a log file
  (SLURM, a test's captured stderr) they garble the lines printed after them.
  """
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()


def get_builder(data_cfg: ml_collections.ConfigDict, prepare: bool = True) -> Any:
  """The tfds builder of ``data_cfg``, prepared (once, under a file lock) unless ``prepare=False``.

  Raises:
    FileNotFoundError: local set whose manual dir or files are missing.
    research.data.builders.common.InputError: malformed raw files (names file:line), or files
      that differ from the published copy (see :func:`verifies`).
  """
  if data_cfg.source == "local":
    builder = _local_builder(data_cfg)
    if prepare and not is_prepared(builder):
      manual_dir = locations.resolve_manual_dir(data_cfg.manual_dir)
      with _file_lock(Path(builder.data_dir).parent / ".prepare.lock"):
        if not is_prepared(builder):
          _bars_only_on_a_terminal()
          builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
          )
          return builder
      # Another process prepared it while this one waited for the lock: a builder made
      # before that holds no splits, so it is made again from what is on disk now.
      builder = _local_builder(data_cfg)
    return builder
  builder = _catalog_builder(data_cfg)
  if prepare and data_cfg.download and not is_prepared(builder):
    with _file_lock(data_dir(data_cfg) / f".{builder.name}.prepare.lock"):
      _bars_only_on_a_terminal()
      builder.download_and_prepare(file_format="array_record")
  return builder


def split_name(split: str) -> str:
  """The split a tfds split string reads from: ``'dev'`` for ``'dev[:256]'`` or ``'dev'``."""
  return split.split("[", 1)[0]


def check_split(builder: Any, split: str) -> None:
  """Raises a UsageError (a ValueError) naming the available splits when ``split`` is not one.

  tfds slices (``'dev[:256]'``, ``'train[:10%]'``) of an available split are accepted.
  """
  available = list(builder.info.splits.keys())
  if available and split_name(split) not in available:
    raise errors.UsageError(
      f"{builder.info.full_name} has no split {split!r}; available: {sorted(available)} "
      "(splits absent from the raw files are not produced)."
    )


def check_splits(data_cfg: ml_collections.ConfigDict, splits: Mapping[str, str]) -> None:
  """Raises unless the data set has every split in ``splits``, before a run reads any of them.

  A trainer reads its eval split only at the first evaluation; checked there, a typo would cost
  the steps before it.

  Args:
    data_cfg: the data set's config (local sets are prepared if needed, as training would).
    splits: the config key that names each split (for the message, e.g.
      ``tasks.sst2.data.splits.eval``) -> the split (tfds slices allowed).

  Raises:
    research.errors.UsageError: a split the data set does not define (``dev`` for
      ``validation``), naming the key and the splits there are.
    research.errors.RunError: a split the data set defines but whose raw file is missing from
      the manual dir (e.g. no ``dev.tsv``), naming the file.
    FileNotFoundError, research.data.builders.common.InputError: see :func:`get_builder`.
  """
  builder = get_builder(data_cfg, prepare=data_cfg.source == "local")
  available = sorted(builder.info.splits.keys())
  if not available:  # A catalog set not downloaded yet: its splits are known once it is.
    return
  files = getattr(builder.builder_config, "files", None) or {}
  for key, split in splits.items():
    name = split_name(split)
    if name in available:
      continue
    if data_cfg.source == "local" and name in files:
      manual_dir = locations.resolve_manual_dir(data_cfg.manual_dir)
      missing = [
        str(manual_dir / f)
        for f in common.file_names(files[name])
        if not (manual_dir / f).is_file()
      ]
      raise errors.RunError(
        f"{key}={split!r}: the {data_cfg.name} split {name!r} is read from "
        f"{', '.join(missing)}, which is missing; put the file there or choose a split that "
        f"exists: {available}"
      )
    raise errors.UsageError(
      f"{key}={split!r}: {data_cfg.name} has no split {name!r}; available: {available}"
    )


def _as_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _as_str(value.item())
  return str(value)


def _convert(value: Any, feature: Any) -> Any:
  """A decoded feature value as str / int / float / list of those / int64 array."""
  if isinstance(feature, tfds.features.Sequence):
    inner = feature.feature
    if isinstance(inner, tfds.features.Text):
      return [_as_str(v) for v in value]
    return np.asarray(value, dtype=np.int64).reshape(-1)
  if isinstance(feature, tfds.features.Text):
    return _as_str(value)
  value = np.asarray(value).reshape(())
  return float(value) if value.dtype.kind == "f" else int(value)


def _read_decoded(source: Any, n: int) -> list[dict[str, Any]]:
  """All examples of a data source, in chunks when it supports ``__getitems__``."""
  records: list[dict[str, Any]] = []
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(n, start + _CHUNK)))
    try:
      records.extend(source.__getitems__(keys))
    except (TypeError, AttributeError):  # tfds.testing.mock_data's __getitems__ is broken.
      records.extend(source[k] for k in keys)
  return records


def _fast_raw(builder: Any, split: str, keys: Sequence[str]) -> dict[str, list[Any]] | None:
  """Reads Text / ClassLabel / Sequence-of-those features straight from the tf.Example protos.

  About 4x faster than tfds' generic numpy decoding; ``None`` when a feature is of another kind.
  """
  from tensorflow_datasets.proto import tf_example_pb2

  feats = builder.info.features
  kinds = {}
  for k in keys:
    f = feats[k]
    seq = isinstance(f, tfds.features.Sequence)
    inner = f.feature if seq else f
    if isinstance(inner, tfds.features.Text):
      kinds[k] = ("text", seq)
    elif isinstance(inner, tfds.features.ClassLabel):
      kinds[k] = ("int", seq)
    else:
      return None
  raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  out: dict[str, list[Any]] = {k: [] for k in keys}
  for start in range(0, len(raw), _CHUNK):
    for record in raw.__getitems__(list(range(start, min(len(raw), start + _CHUNK)))):
      fmap = tf_example_pb2.Example.FromString(record).features.feature
      for k, (kind, seq) in kinds.items():
        if kind == "text":
          values = [b.decode("utf-8") for b in fmap[k].bytes_list.value]
        else:
          values = np.asarray(fmap[k].int64_list.value, dtype=np.int64)
        out[k].append(values if seq else values[0])
  return out


def read_columns(builder: Any, split: str, keys: Sequence[str]) -> dict[str, list[Any]]:
  """The features ``keys`` of every example of ``split``, in data-source order.

  Returns:
    key -> list over examples of ``str`` (Text), ``int`` (integer scalars, ClassLabel),
    ``float`` (float scalars), ``list[str]``
    (Sequence of Text) or ``np.int64`` arrays (Sequence of ints).

  Raises:
    ValueError: unknown split; KeyError: a key that is not a feature of the data set.
  """
  check_split(builder, split)
  feats = builder.info.features
  missing = [k for k in keys if k not in feats]
  if missing:
    raise KeyError(
      f"{builder.info.full_name} has no feature(s) {missing}; features: {sorted(feats.keys())}."
    )
  if is_prepared(builder):
    fast = _fast_raw(builder, split, keys)
    if fast is not None:
      return fast
  source = builder.as_data_source(split)
  records = _read_decoded(source, len(source))
  return {k: [_convert(r[k], feats[k]) for r in records] for k in keys}

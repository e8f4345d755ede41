"""JAX's persistent compilation cache, on by default for every run of the command line.

Most of a short run's time to its first step is XLA compiling the same programs as the run
before it (the train step, the state's creation, the evaluation step). JAX can keep compiled
programs on disk, keyed by the program, the compiler options and the devices, and load them
instead of compiling; it does so on CPU, GPU and TPU. This module turns that on once, at program
start (research.main), in a per-user directory:

- ``$RESEARCH_COMPILE_CACHE``: ``off`` (or ``0``, ``false``, ``no``, ``none``) disables the cache;
  a path moves it there;
- otherwise ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own variable: the tests point it at
  the repository's ``.cache/jax``);
- otherwise ``$XDG_CACHE_HOME/research/jax``, by default ``~/.cache/research/jax``.

Programs that compile in under :data:`MIN_COMPILE_TIME_S` are not stored (JAX's default of one
second would leave out the many small programs a run starts with, which together are a good
part of the wait); ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` overrides it. The directory
is not pruned: delete it to reclaim the space (a run refills what it needs). A directory that
cannot be created disables the cache with a warning instead of stopping the run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

COMPILE_CACHE_ENV = "RESEARCH_COMPILE_CACHE"
JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
JAX_MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
MIN_COMPILE_TIME_S = 0.1
OFF = ("off", "0", "false", "no", "none")


def default_dir(env: Mapping[str, str] | None = None) -> Path:
  """``$XDG_CACHE_HOME/research/jax``, by default ``~/.cache/research/jax``."""
  env = os.environ if env is None else env
  base = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
  return Path(base) / "research" / "jax"


def cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
  """Where the cache goes for ``env`` (default ``os.environ``); None when it is off."""
  env = os.environ if env is None else env
  value = env.get(COMPILE_CACHE_ENV, "").strip()
  if value.lower() in OFF and value:
    return None
  if value:
    return Path(value).expanduser()
  if env.get(JAX_DIR_ENV):
    return Path(env[JAX_DIR_ENV]).expanduser()
  return default_dir(env)


def enable(env: Mapping[str, str] | None = None) -> Path | None:
  """Points JAX's persistent compilation cache at :func:`cache_dir`, or turns it off.

  Call it once at program start, before the first compilation: JAX reads the directory when
  it first compiles, and a later change is not seen by this process.

  Returns:
    The directory in use, or None when the cache is off (asked for, or not creatable).
  """
  import jax

  env = os.environ if env is None else env
  directory = cache_dir(env)
  if directory is not None:
    try:
      directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      print(f"warning: compilation cache off: cannot create {directory} ({e})", file=sys.stderr)
      directory = None
  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  if not env.get(JAX_MIN_TIME_ENV):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return directory

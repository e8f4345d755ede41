"""Benchmark: time to the first train step with a cold and a warm compilation cache.

  python -m research.bench.compile_cache [--config=configs/sst2_minilm.py:tiny] [--runs=2]

Runs the same training command (``python -m research.main``, a fresh workdir each time) in
fresh subprocesses, one after the other, with ``$RESEARCH_COMPILE_CACHE`` pointing at a new empty
directory: the first run compiles everything and fills it, the later ones load from it (see
research/compile_cache.py). Each run's ``time_to_first_step_s`` (results.json: process start to
the end of the first step, imports, data and init included) and wall time are printed. The
last line is ``second_over_first_compile=<second run's time to first step / first run's>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from research import compile_cache
from research.bench import timing
from research.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[2]


def run_once(
  config: str, workdir: Path, cache: Path, extra: list[str], min_compile_s: float | None
) -> dict:
  """One training run in a fresh process; returns its results.json plus the process's wall."""
  env = child_env()
  env[compile_cache.COMPILE_CACHE_ENV] = str(cache)
  for name in (compile_cache.JAX_DIR_ENV, compile_cache.JAX_MIN_TIME_ENV):
    env.pop(name, None)  # The run's own defaults, as a user gets them.
  if min_compile_s is not None:
    env[compile_cache.JAX_MIN_TIME_ENV] = str(min_compile_s)
  cmd = [sys.executable, "-m", "research.main", f"--config={config}", f"--workdir={workdir}"]
  start = time.time()
  out = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    raise SystemExit(f"run failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
  results = json.loads((workdir / "results.json").read_text())
  results["process_s"] = time.time() - start
  return results


def cache_size(directory: Path) -> tuple[int, int]:
  files = [p for p in directory.rglob("*") if p.is_file()]
  return len(files), sum(p.stat().st_size for p in files)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/sst2_minilm.py:tiny")
  p.add_argument("--runs", type=int, default=2, help="runs in a row on the same cache (>= 2)")
  p.add_argument("--override", action="append", default=[], help="extra --config.KEY=VALUE")
  p.add_argument(
    "--min_compile_s",
    type=float,
    default=None,
    help=f"programs compiled faster are not stored (default {compile_cache.MIN_COMPILE_TIME_S})",
  )
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  load_before = timing.load()
  firsts = []
  with tempfile.TemporaryDirectory(prefix="compile_cache_bench_") as tmp:
    cache = Path(tmp) / "cache"
    for i in range(max(args.runs, 2)):
      results = run_once(
        args.config, Path(tmp) / f"run{i}", cache, args.override, args.min_compile_s
      )
      files, size = cache_size(cache)
      firsts.append(results["time_to_first_step_s"])
      print(
        f"run {i + 1}: time_to_first_step_s {results['time_to_first_step_s']:.2f}, "
        f"process {results['process_s']:.2f} s, steps {results['steps']}, "
        f"cache after: {files} files, {size / 2**20:.1f} MiB"
      )
  print(f"config: {args.config} {' '.join(args.override)}".rstrip())
  print(timing.load_line(load_before))
  print(f"first_s={firsts[0]:.2f} second_s={firsts[1]:.2f}")
  print(f"second_over_first_compile={firsts[1] / firsts[0]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

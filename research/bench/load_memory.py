"""Benchmark: peak host memory and time of loading a sharded HF checkpoint.

  python -m research.bench.load_memory            # ~1B-parameter T5 v1.1-shaped, 4 GB on disk
  python -m research.bench.load_memory --tiny     # a few MB, seconds

Builds a random T5 (v1.1 layout: gated GELU, untied ``lm_head``) checkpoint in HF layout, as
sharded safetensors with an index, then loads it with research.transfer.hf.load_pretrained in a
fresh subprocess per mode, so each peak is that load's alone:

- ``fp32``: float32 params on the host;
- ``bf16``: ``dtype=jnp.bfloat16`` straight from the fp32 file;
- ``sharded``: float32, each leaf placed as it is read on 8 simulated CPU devices (its first
  dimension split over them), through ``shardings=``;
- ``eager`` (only with ``--modes``; ``--tiny`` runs it): the loader as it was before streaming,
  every tensor read at once with ``safetensors.numpy.load_file`` and then converted.

Memory is the child's peak RSS (``VmHWM``; see :func:`peak_rss` for why not ``ru_maxrss``),
reported raw and minus the peak of a child that only imports jax and the project (the
baseline). Per mode one line ends in ``peak_rss_over_checkpoint=<(peak - baseline) /
checkpoint bytes on disk>``, and the last line repeats fp32's. The goal is at most 1.5 in fp32:
one converted copy plus one raw tensor is about 1.0; the eager loader holds every raw tensor
before converting any (and, through safetensors' memory map, a shard's pages). The time is the
load call's wall clock and CPU time (user + system, all threads), with the files most likely in
the page cache as they were just written. The checkpoint is written shard by shard (one
shard's tensors in memory at a time) into a temporary directory that is removed at the end,
unless ``--dir`` names one and ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FULL = dict(  # T5 v1.1-shaped, 24 + 24 layers: about 0.97B parameters.
  vocab_size=32128,
  hidden_size=1024,
  num_layers=24,
  num_decoder_layers=24,
  num_heads=16,
  head_dim=64,
  intermediate_size=4096,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
)
TINY = dict(
  vocab_size=1000,
  hidden_size=128,
  num_layers=2,
  num_decoder_layers=2,
  num_heads=4,
  head_dim=32,
  intermediate_size=256,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
)
DEVICES = 8
MODES = ("fp32", "bf16", "sharded", "eager")


def t5_config(sizes: dict[str, int]) -> Any:
  """A T5 v1.1-style config (gated GELU, untied output layer) of the given sizes."""
  from research.models.encoder_decoder import t5

  return t5.tiny(
    gated=True,
    hidden_act="gelu_new",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    **sizes,
  )


def build_checkpoint(directory: Path, cfg: Any, shard_bytes: int, seed: int = 0) -> int:
  """Writes ``cfg``'s random weights as an HF checkpoint of safetensors shards plus an index.

  Shapes come from the model (``jax.eval_shape``), names and layout from the family's weight
  map and ``to_hf_tensor``; shards are planned from the shapes first so each is generated,
  written and dropped in turn, and the model is never in memory whole.

  Returns:
    The bytes of the tensors written (the checkpoint's size on disk, less headers).
  """
  from safetensors.numpy import save_file

  from research.models import families
  from research.transfer import hf

  family = families.family_of(cfg)
  names = family.weight_names(cfg)
  shapes = hf.expected_shapes(family, cfg)
  shards: list[list[str]] = [[]]
  size = 0
  for path in names:
    nbytes = 4 * math.prod(shapes[path])
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(path)
    size += nbytes
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  weight_map, total = {}, 0
  for i, group in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for path in group:
      value = rng.random(shapes[path], dtype=np.float32)  # Uniform: faster than normal.
      value -= 0.5
      value *= 0.1
      tensors[names[path]] = family.to_hf_tensor(path, value)
      weight_map[names[path]] = file
      total += value.nbytes
    save_file(tensors, str(directory / file), metadata={"format": "pt"})
    del tensors
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (directory / hf.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
  (directory / hf.CONFIG).write_text(json.dumps(family.to_hf(cfg), indent=2) + "\n")
  return total


def stored_config(directory: Path) -> tuple[Any, Any]:
  """The config and family of a checkpoint built here, fitted to its index as loading does."""
  from research.models import families
  from research.transfer import hf

  cfg = hf.load_config(directory)
  family = families.family_of(cfg)
  stored = json.loads((directory / hf.SAFETENSORS_INDEX).read_text())["weight_map"]
  return family.fit_to_weights(cfg, stored, family.weight_names(cfg)), family


def eager_load(directory: Path, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The loader as it was before streaming: all raw tensors first, then all converted ones.

  For the comparison only (no prefix, legacy-name or shape handling): flat ``{path: array}``.
  """
  from safetensors.numpy import load_file

  cfg, family = stored_config(directory)
  raw = {}
  for file in sorted(directory.glob("*.safetensors")):
    raw.update(load_file(file))
  return {
    ours: family.from_hf_tensor(ours, raw.pop(theirs)).astype(dtype)
    for ours, theirs in family.weight_names(cfg).items()
  }


def fsdp_shardings(directory: Path) -> dict[str, Any]:
  """Per leaf, its first dimension split over all devices (replicated when it does not divide)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from research.transfer import hf

  cfg, family = stored_config(directory)
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
  return {
    path: NamedSharding(
      mesh, PartitionSpec("fsdp") if shape and shape[0] % mesh.size == 0 else PartitionSpec()
    )
    for path, shape in hf.expected_shapes(family, cfg).items()
  }


def child(mode: str, directory: Path) -> dict[str, Any]:
  """Runs one mode in this (fresh) process and returns its time and peak RSS."""
  import jax
  import jax.numpy as jnp

  from research.transfer import hf

  seconds = cpu = 0.0
  if mode != "baseline":
    kwargs: dict[str, Any] = {"dtype": jnp.bfloat16} if mode == "bf16" else {}
    if mode == "sharded":
      kwargs["shardings"] = fsdp_shardings(directory)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if mode == "eager":
      params = eager_load(directory)
    else:
      _, params = hf.load_pretrained(directory, **kwargs)
    jax.block_until_ready(params)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    del params
  return {"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak_rss()}


def cpu_seconds() -> float:
  """User + system CPU time of this process: less moved by other jobs than the wall clock."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
  """This process's peak resident bytes since its exec: ``VmHWM`` where /proc has it.

  ``ru_maxrss`` is the fallback only: Linux carries the pre-exec image's peak over an exec,
  and Python starts children by (v)fork, so a child's ``ru_maxrss`` is at least its parent's
  peak (here, the parent that wrote the checkpoint).
  """
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux.


def run_child(mode: str, directory: Path) -> dict[str, Any]:
  """``child(mode)`` in a new interpreter (8 CPU devices for ``sharded``)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if mode == "sharded":
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
  command = [sys.executable, "-m", "research.bench.load_memory", "--child", mode, str(directory)]
  out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
  """MemAvailable of /proc/meminfo (0 where there is none)."""
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m research.bench.load_memory", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--tiny", action="store_true", help="a few-MB model, for a test")
  parser.add_argument("--dir", help="write the checkpoint here (default: a temporary directory)")
  parser.add_argument("--keep", action="store_true", help="do not remove the checkpoint")
  parser.add_argument("--modes", default=None, help=f"comma-separated, of {','.join(MODES)}")
  parser.add_argument("--shard-mb", type=float, default=None, help="shard size (MB)")
  parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child[0], Path(args.child[1]))))
    return 0
  modes = (args.modes or ("fp32,bf16,sharded,eager" if args.tiny else "fp32,bf16,sharded")).split(
    ","
  )
  if unknown := set(modes) - set(MODES):
    parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
  cfg = t5_config(TINY if args.tiny else FULL)
  shard_bytes = int((args.shard_mb or (1 if args.tiny else 2000)) * 1e6)
  directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="load_memory_"))
  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
  try:
    start = time.perf_counter()
    size = build_checkpoint(directory, cfg, shard_bytes)
    shards = len(list(directory.glob("*.safetensors")))
    print(
      f"checkpoint: {size // 4:,} parameters, {size / 1e9:.3f} GB fp32 in {shards} shard(s) "
      f"at {directory} (written in {time.perf_counter() - start:.1f} s)",
      flush=True,
    )
    if available_bytes() and available_bytes() < 1.6 * size:
      print(f"warning: only {available_bytes() / 1e9:.1f} GB available", flush=True)
    base = run_child("baseline", directory)["peak_rss"]
    print(f"baseline (imports only): peak_rss_mb={base / 1e6:.0f}", flush=True)
    ratios = {}
    for mode in modes:
      result = run_child(mode, directory)
      peak = result["peak_rss"]
      print(
        f"mode={mode} load_s={result['seconds']:.2f} cpu_s={result['cpu_seconds']:.2f} "
        f"peak_rss_mb={peak / 1e6:.0f} "
        f"over_baseline_mb={(peak - base) / 1e6:.0f} "
        f"peak_rss_with_baseline_over_checkpoint={peak / size:.3f} "
        f"peak_rss_over_checkpoint={(peak - base) / size:.3f}",
        flush=True,
      )
      ratios[mode] = (peak - base) / size
  finally:
    if not args.keep:
      shutil.rmtree(directory, ignore_errors=True)
  print(f"load average {os.getloadavg()[0]:.1f}")
  print(f"peak_rss_over_checkpoint={ratios.get('fp32', next(iter(ratios.values()))):.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

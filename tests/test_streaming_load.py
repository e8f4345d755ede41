"""Streaming HF import: one tensor at a time gives what reading everything at once gave.

The reference is safetensors' own reader (``load_file``, the loader before streaming), so these
tests also check our header parsing and plain-read path against the library.
"""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import paths
from research.bench import load_memory
from research.transfer import hf


@pytest.fixture(scope="module")
def sharded_t5(tmp_path_factory):
  """A tiny T5 v1.1-style checkpoint in five safetensors shards with an index."""
  directory = tmp_path_factory.mktemp("t5_sharded")
  load_memory.build_checkpoint(directory, load_memory.t5_config(load_memory.TINY), 1_000_000)
  assert len(list(directory.glob("*.safetensors"))) > 1
  assert (directory / hf.SAFETENSORS_INDEX).is_file()
  return directory


def test_streaming_fp32_equals_all_at_once_bitwise(sharded_t5):
  _, params = hf.load_pretrained(sharded_t5)
  flat = paths.flatten(params)
  reference = load_memory.eager_load(sharded_t5)
  assert flat.keys() == reference.keys()
  for path, value in reference.items():
    assert flat[path].dtype == np.float32, path
    np.testing.assert_array_equal(flat[path], value, err_msg=path)


def test_bf16_from_disk_equals_fp32_cast(sharded_t5):
  _, fp32 = hf.load_pretrained(sharded_t5)
  _, bf16 = hf.load_pretrained(sharded_t5, dtype=jnp.bfloat16)
  for path, value in paths.flatten(fp32).items():
    got = paths.flatten(bf16)[path]
    assert got.dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(got.view(np.uint16), value.astype(jnp.bfloat16).view(np.uint16))


def test_shardings_place_each_leaf_as_read(sharded_t5):
  shardings = load_memory.fsdp_shardings(sharded_t5)
  _, fp32 = hf.load_pretrained(sharded_t5)
  _, placed = hf.load_pretrained(sharded_t5, shardings=shardings)
  for path, value in paths.flatten(placed).items():
    assert isinstance(value, jax.Array) and value.sharding == shardings[path], path
    np.testing.assert_array_equal(np.asarray(value), paths.flatten(fp32)[path], err_msg=path)
  kernel = "encoder/layer_0/ffn/up/kernel"
  assert len(paths.flatten(placed)[kernel].addressable_shards) == jax.device_count()


def test_bf16_checkpoint_reads_through_ml_dtypes(tmp_path, sharded_t5):
  """safetensors' numpy reader has no bfloat16; ours reads it (and casts to the dtype asked)."""
  import shutil

  import torch
  from safetensors.torch import load_file, save_file

  for file in sharded_t5.iterdir():
    shutil.copy(file, tmp_path / file.name)
  for file in tmp_path.glob("*.safetensors"):
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file)
  _, fp32 = hf.load_pretrained(sharded_t5)
  _, params = hf.load_pretrained(tmp_path)
  for path, value in paths.flatten(params).items():
    assert value.dtype == np.float32, path
    np.testing.assert_array_equal(value, paths.flatten(fp32)[path].astype(jnp.bfloat16), path)


def test_damaged_header_names_the_shard(tmp_path, sharded_t5):
  import shutil

  for file in sharded_t5.iterdir():
    shutil.copy(file, tmp_path / file.name)
  shard = sorted(tmp_path.glob("*.safetensors"))[1]
  shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
  with pytest.raises(hf.CheckpointError, match=re.escape(shard.name) + ": cannot read"):
    hf.load_pretrained(tmp_path)
  shard.unlink()
  with pytest.raises(hf.CheckpointError, match="listed in the index but missing"):
    hf.load_pretrained(tmp_path)


def test_benchmark_tiny_prints_parseable_figures():
  out = subprocess.run(
    [sys.executable, "-m", "research.bench.load_memory", "--tiny", "--modes=fp32,bf16"],
    check=True,
    capture_output=True,
    text=True,
    timeout=600,
  ).stdout
  rows = re.findall(
    r"mode=(\w+) load_s=([\d.]+) .*peak_rss_over_checkpoint=(-?[\d.]+)$", out, re.MULTILINE
  )
  assert [r[0] for r in rows] == ["fp32", "bf16"], out
  for _, seconds, ratio in rows:
    assert float(seconds) > 0 and np.isfinite(float(ratio))

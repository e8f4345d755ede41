"""Parallel modes on 8 simulated CPU devices: single device, jit data-parallel, jit with fsdp and
pmap (shard_map) follow the same loss curve; fsdp shards params and moments 8 ways; dropout masks
do not depend on how the batch is sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_util import tiny_config

from research import optim, paths
from research.models.config import EncoderConfig
from research.models.encoder import Encoder
from research.train import parallel
from research.train.state import TrainState, build_model, init_fn, model_family
from research.train.steps import make_train_step

STEPS, BATCH, SEQ, VOCAB = 10, 16, 16, 512


def batches(n: int = STEPS) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    lengths = rng.integers(4, SEQ + 1, BATCH)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    out.append(
      {
        "input_ids": (rng.integers(1, VOCAB, (BATCH, SEQ)) * mask).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((BATCH, SEQ), np.int32),
        "labels": rng.integers(0, 2, BATCH).astype(np.int32),
        "example_mask": np.ones(BATCH, np.float32),
      }
    )
  return out


_RUNS: dict[tuple, tuple] = {}


def train(
  mode: str,
  devices: int,
  fsdp: int = 1,
  dropout: float = 0.0,
  steps: int = STEPS,
  dtype: str = "float32",
  platform: str | None = None,
):
  """Losses of ``steps`` steps and the final state, built the way the trainer builds them, on
  the first ``devices`` devices of ``platform`` (None: the default backend)."""
  key = (mode, devices, fsdp, dropout, steps, dtype, platform)
  if key not in _RUNS:
    _RUNS[key] = _train(*key)
  return _RUNS[key]


def _train(mode, devices, fsdp, dropout, steps, dtype, platform):
  config = tiny_config()
  config.model.encoder_overrides = {**config.model.encoder_overrides, "vocab_size": VOCAB}
  config.model.dropout = dropout
  config.tasks.sst2.head.dropout = dropout
  config.parallel.update(mode=mode, fsdp=fsdp)
  config.model.dtype = dtype
  model, enc = build_model(config, {"sst2": 2})
  mesh = parallel.make_mesh(config.parallel, jax.devices(platform)[:devices])
  init = init_fn(model)
  rng = jax.random.key_data(jax.random.key(0))
  tx, _ = optim.build(config.optim, jax.eval_shape(init, rng), STEPS)
  create = lambda r: TrainState.create(init(r), tx, r)
  rules = model_family(config.model).sharding_rules
  shardings = parallel.state_shardings(
    jax.eval_shape(create, rng), mesh, config.parallel, rules, model_config=enc
  )
  state = jax.jit(create, out_shardings=shardings)(rng)
  bsharding = parallel.batch_sharding(mesh)
  step = parallel.compile_train_step(
    lambda axis: make_train_step(model, "sst2", "classification", 1, axis),
    mode,
    mesh,
    shardings,
    bsharding,
  )
  losses = []
  for batch in batches()[:steps]:
    state, metrics = step(state, parallel.global_batch(batch, bsharding))
    losses.append(metrics["loss"])
  return np.asarray(jax.device_get(losses)), state


@pytest.fixture(scope="module")
def single():
  return train("jit", devices=1)


@pytest.mark.parametrize(
  "mode, fsdp", [("jit", 1), ("jit", 8), ("pmap", 1)], ids=["jit_dp", "jit_fsdp", "pmap"]
)
def test_parallel_modes_match_single_device_loss_curve(single, mode, fsdp):
  assert jax.device_count() == 8
  ref_losses, ref_state = single
  losses, state = train(mode, devices=8, fsdp=fsdp)
  assert np.all(np.isfinite(losses)) and losses[0] != losses[-1]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  ref, got = paths.flatten(jax.device_get(ref_state.params)), paths.flatten(state.params)
  for path, value in ref.items():
    np.testing.assert_allclose(np.asarray(got[path]), value, rtol=1e-4, atol=1e-6, err_msg=path)


def test_fsdp_puts_one_eighth_of_each_large_kernel_on_each_device():
  _, state = train("jit", devices=8, fsdp=8)
  # [32, 64]: the BERT rules put fsdp on the input dim (the output dim is the tensor axis's).
  kernel = state.params["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]
  assert len(kernel.addressable_shards) == 8
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 64)}
  big = 0
  for where, tree in (("params", state.params), ("opt_state", state.opt_state)):
    for path, leaf in paths.flatten(tree).items():
      if not path.endswith(("kernel", "embedding")) or not hasattr(leaf, "addressable_shards"):
        continue
      if any(d % 8 == 0 for d in leaf.shape):
        big += 1
        for shard in leaf.addressable_shards:
          assert shard.data.size * 8 == leaf.size, f"{where}/{path}: {shard.data.shape}"
  assert big > 20  # params and both Adam moments of every kernel and embedding


def test_dropout_is_the_same_however_the_batch_is_sharded(single):
  single_losses, _ = train("jit", devices=1, dropout=0.1, steps=3)
  sharded_losses, _ = train("jit", devices=8, dropout=0.1, steps=3)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  assert np.max(np.abs(single_losses - single[0][:3])) > 1e-4  # dropout did act


def test_bf16_compute_keeps_fp32_master_weights_and_tracks_fp32(single):
  losses, state = train("jit", devices=8, steps=3, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
  assert losses.dtype == np.float32
  np.testing.assert_allclose(losses, single[0][:3], rtol=2e-2)


def test_pmap_rejects_fsdp_and_unknown_modes_fail():
  cfg = tiny_config().parallel
  cfg.update(mode="pmap", fsdp=8)
  with pytest.raises(ValueError, match="pmap"):
    parallel.make_mesh(cfg)
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="expected one of"):
    parallel.compile_train_step(lambda a: None, "pjit", mesh, {}, parallel.batch_sharding(mesh))


def test_hash_dropout_keeps_the_right_fraction_with_fresh_masks():
  cfg = EncoderConfig(
    vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=64
  )
  enc = Encoder(cfg.replace(hidden_dropout=0.25, attention_dropout=0.25))
  ids = jnp.ones((8, 64), jnp.int32)
  params = enc.init(jax.random.key(0), ids)

  @jax.jit
  def apply(key):
    return enc.apply(params, ids, deterministic=False, rngs={"dropout": key})["hidden_states"]

  hidden = lambda seed: np.asarray(apply(jax.random.key(seed)))

  a, b = hidden(1), hidden(2)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, hidden(1))
  # The embedding dropout alone: zeros appear at the dropout rate.
  import flax.linen as nn

  from research.models import common

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x):
      return common.dropout(self, x, 0.25, deterministic=False)

  drop = jax.jit(lambda key: Drop().apply({}, jnp.ones((256, 1024)), rngs={"dropout": key}))
  masks = [np.asarray(drop(jax.random.key(s))) for s in (3, 4)]
  for m in masks:
    assert abs(np.mean(m == 0) - 0.25) < 0.005
    np.testing.assert_allclose(m[m != 0], 1 / 0.75, rtol=1e-6)
  overlap = np.mean((masks[0] == 0) & (masks[1] == 0))
  assert abs(overlap - 0.25**2) < 0.005  # independent masks for different keys

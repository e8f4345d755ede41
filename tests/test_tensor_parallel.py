"""Tensor parallelism next to fsdp on 8 simulated CPU devices.

The families' Megatron-style rules must shard what they say (q/k/v over heads, the MLP over its
width, whole heads only, GQA k/v replicated when the axis does not divide them) and must not
change a number: the forward, the gradients and one real train step of a tiny BERT-like model,
Llama and GPT-2 on a (data, fsdp, tensor) mesh equal the single-device ones.
"""

import json

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from train_util import load_config_module, tiny_config

from research import paths
from research.models import families
from research.models import family as family_lib
from research.models.decoder_only import gpt2, llama
from research.train import parallel, setup
from research.train.state import build_model, init_fn
from research.train.steps import apply_model, make_train_step

BATCH, SEQ, VOCAB = 8, 16, 512
# (data, fsdp, tensor); the tensor-only mesh keeps whole heads (4 heads over 4 devices).
MESHES = {"2x2x2": (2, 2, 2), "1x1x4": (1, 1, 4)}
DECODER = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=VOCAB)


def family_config(name: str, checkpoint: str = "") -> ml_collections.ConfigDict:
  """The tiny config of the family's SST-2 experiment, full fine-tuning, a 512-word vocab, no
  warmup (the first step then moves the params); ``checkpoint`` holds the config.json of a
  family that does not read MiniLM's."""
  if name == "bert":
    config = tiny_config()
    config.model.encoder_overrides = {**config.model.encoder_overrides, "vocab_size": VOCAB}
  else:
    config = load_config_module("sst2_decoder").get_config("tiny,peft=none")
    sizes = dict(DECODER, num_kv_heads=2, head_dim=8) if name == "llama" else DECODER
    config.model.update(family=name, checkpoint=checkpoint or config.model.checkpoint)
    config.model.encoder_overrides = sizes
  config.optim.update(warmup_fraction=0.0, warmup_steps=0)
  return config


def batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  lengths = rng.integers(4, SEQ + 1, BATCH)
  mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
  return {
    "input_ids": (rng.integers(1, VOCAB, (BATCH, SEQ)) * mask).astype(np.int32),
    "attention_mask": mask,
    "token_type_ids": np.zeros((BATCH, SEQ), np.int32),
    "labels": rng.integers(0, 2, BATCH).astype(np.int32),
    "example_mask": np.ones(BATCH, np.float32),
  }


_RUNS: dict[tuple, dict] = {}


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> str:
  """A directory with the config.json of a tiny GPT-2 (the model itself is initialised)."""
  directory = tmp_path_factory.mktemp("tiny_gpt2")
  hf_config = gpt2.FAMILY.to_hf(gpt2.GPT2Config.tiny(**DECODER))
  (directory / "config.json").write_text(json.dumps(hf_config))
  return str(directory)


def run(name: str, mesh_shape: tuple[int, int, int], checkpoint: str = "") -> dict:
  """Logits, gradients and one train step of family ``name`` on a (data, fsdp, tensor) mesh,
  with the state planned and created as the trainer does (research.train.setup.plan_state)."""
  if (name, mesh_shape) not in _RUNS:
    _RUNS[name, mesh_shape] = _run(name, mesh_shape, checkpoint)
  return _RUNS[name, mesh_shape]


def _run(name: str, mesh_shape: tuple[int, int, int], checkpoint: str) -> dict:
  data, fsdp, tensor = mesh_shape
  config = family_config(name, checkpoint)
  config.parallel.update(fsdp=fsdp, tensor=tensor)
  model, _ = build_model(config, {"sst2": 2})
  mesh = parallel.make_mesh(config.parallel, jax.devices()[: data * fsdp * tensor])
  assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
  plan = setup.plan_state(config, init_fn(model), mesh, 10)
  state = jax.jit(plan.create, out_shardings=plan.shardings)(plan.rng)
  bsharding = parallel.batch_sharding(mesh)
  inputs = parallel.global_batch(batch(), bsharding)
  pspec = plan.shardings.params

  def loss(params, b):
    logits = apply_model(model, params, b, "sst2")
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

  logits = jax.jit(lambda p, b: apply_model(model, p, b, "sst2"), in_shardings=(pspec, bsharding))(
    state.params, inputs
  )
  grads = jax.jit(jax.grad(loss), in_shardings=(pspec, bsharding), out_shardings=pspec)(
    state.params, inputs
  )
  out = dict(
    logits=np.asarray(logits),
    grads={k: np.asarray(v) for k, v in paths.flatten(grads).items()},
  )
  step = parallel.compile_train_step(
    lambda axis: make_train_step(model, "sst2", "classification", 1, axis),
    "jit",
    mesh,
    plan.shardings,
    bsharding,
  )
  params0 = jax.tree.map(np.asarray, state.params)  # The step donates the state.
  new, metrics = step(state, inputs)
  out.update(
    params0=paths.flatten(params0),
    loss=float(metrics["loss"]),
    new_params={k: np.asarray(v) for k, v in paths.flatten(new.params).items()},
    new_state=new,
    params=new.params,  # Laid out by the plan's shardings (the step's out_shardings).
  )
  return out


def max_diff(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def check_matches_single_device(name: str, mesh_shape: tuple[int, int, int], ckpt="") -> None:
  ref, got = run(name, (1, 1, 1), ckpt), run(name, mesh_shape, ckpt)
  assert max_diff(ref["params0"], got["params0"]) == 0  # The same init, whatever the layout.
  np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
  for path, g in ref["grads"].items():
    np.testing.assert_allclose(got["grads"][path], g, atol=1e-5, rtol=1e-5, err_msg=path)
  assert max(float(np.max(np.abs(g))) for g in ref["grads"].values()) > 1e-3  # Not all zero.
  for path, p in ref["new_params"].items():
    np.testing.assert_allclose(got["new_params"][path], p, atol=1e-5, rtol=1e-5, err_msg=path)
  assert max_diff(ref["new_params"], ref["params0"]) > 1e-4  # The step did move the params.


def spec(tree, path: str) -> P:
  return paths.flatten(tree)[path].sharding.spec


def shard_shapes(tree, path: str) -> set[tuple[int, ...]]:
  return {s.data.shape for s in paths.flatten(tree)[path].addressable_shards}


@pytest.mark.parametrize("mesh", list(MESHES), ids=list(MESHES))
def test_tensor_parallel_bert_matches_single_device(mesh):
  check_matches_single_device("bert", MESHES[mesh])


@pytest.mark.parametrize("mesh", list(MESHES), ids=list(MESHES))
def test_tensor_parallel_llama_matches_single_device(mesh):
  check_matches_single_device("llama", MESHES[mesh])


def test_tensor_parallel_gpt2_matches_single_device(gpt2_checkpoint):
  check_matches_single_device("gpt2", MESHES["2x2x2"], gpt2_checkpoint)


def test_tensor_parallel_bert_rules_split_heads_mlp_and_vocab():
  out = run("bert", MESHES["2x2x2"])
  params, layer = out["params"], "encoder/layer_0"
  q = f"{layer}/attention/query/kernel"  # [32, 32]
  assert spec(params, q) == P("fsdp", "tensor")
  assert shard_shapes(params, q) == {(16, 16)}
  assert shard_shapes(params, f"{layer}/attention/query/bias") == {(16,)}  # With its columns.
  assert spec(params, f"{layer}/attention/output/kernel") == P("tensor", "fsdp")
  assert spec(params, f"{layer}/attention/output/bias") == P()  # Added after the all-reduce.
  assert shard_shapes(params, f"{layer}/ffn/intermediate/kernel") == {(16, 32)}  # [32, 64]
  assert shard_shapes(params, f"{layer}/ffn/output/kernel") == {(32, 16)}  # [64, 32]
  assert shard_shapes(params, "encoder/embeddings/word_embeddings/embedding") == {(256, 16)}
  # Adam's moments follow their params.
  opt = paths.flatten(out["new_state"].opt_state)
  moments = [p for p in opt if p.endswith(q)]
  assert len(moments) == 2
  assert all(opt[p].sharding.spec == P("fsdp", "tensor") for p in moments)
  tensor_only = run("bert", MESHES["1x1x4"])["params"]
  assert shard_shapes(tensor_only, q) == {(32, 8)}  # One head (8 columns) per device.


def test_tensor_parallel_llama_splits_kv_heads_only_when_the_axis_divides_them():
  layer = "encoder/layer_0"
  params = run("llama", MESHES["2x2x2"])["params"]  # 4 query heads, 2 kv heads over 2.
  assert shard_shapes(params, f"{layer}/attention/query/kernel") == {(16, 16)}  # [32, 32]
  assert spec(params, f"{layer}/attention/key/kernel") == P("fsdp", "tensor")
  assert shard_shapes(params, f"{layer}/attention/key/kernel") == {(16, 8)}  # [32, 16]
  assert spec(params, f"{layer}/ffn/down/kernel") == P("tensor", "fsdp")
  assert spec(params, f"{layer}/ffn/gate/kernel") == P("fsdp", "tensor")
  assert spec(params, "encoder/lm_head/kernel") == P("fsdp", "tensor")
  params = run("llama", MESHES["1x1x4"])["params"]  # 2 kv heads over 4: k/v replicated.
  assert shard_shapes(params, f"{layer}/attention/query/kernel") == {(32, 8)}
  assert spec(params, f"{layer}/attention/value/kernel") == P()
  assert shard_shapes(params, f"{layer}/ffn/up/kernel") == {(32, 16)}  # [32, 64]


def test_tensor_parallel_gpt2_keeps_the_fused_qkv_off_the_tensor_axis(gpt2_checkpoint):
  params = run("gpt2", MESHES["2x2x2"], gpt2_checkpoint)["params"]
  layer = "encoder/layer_0"
  assert "tensor" not in spec(params, f"{layer}/attention/qkv/kernel")
  assert "tensor" not in spec(params, f"{layer}/attention/output/kernel")
  assert spec(params, f"{layer}/attention/qkv/bias") == P()
  assert spec(params, f"{layer}/ffn/intermediate/kernel") == P("fsdp", "tensor")
  assert spec(params, f"{layer}/ffn/intermediate/bias") == P("tensor")
  assert spec(params, f"{layer}/ffn/output/kernel") == P("tensor", "fsdp")
  assert spec(params, "encoder/embeddings/word_embeddings/embedding") == P("tensor", "fsdp")


# The rule format, on shapes alone.


def mesh_of(data: int, fsdp: int, tensor: int) -> jax.sharding.Mesh:
  cfg = ml_collections.ConfigDict(parallel.default_config())
  cfg.update(fsdp=fsdp, tensor=tensor)
  return parallel.make_mesh(cfg, jax.devices()[: data * fsdp * tensor])


def specs(shapes: dict, mesh, rules, model_config=None, **cfg) -> dict[str, P]:
  tree = paths.unflatten({k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()})
  config = ml_collections.ConfigDict(dict(parallel.default_config(), **cfg))
  out = parallel.state_shardings(tree, mesh, config, rules, model_config=model_config)
  return {k: s.spec for k, s in paths.flatten(out).items()}


class Heads:
  num_heads, num_kv_heads = 4, 2


def test_tensor_parallel_rules_keep_whole_heads_and_fall_back_to_fsdp():
  mesh = mesh_of(1, 2, 4)
  rules = llama.SHARDING
  got = specs(
    {
      "encoder/layer_0/attention/query/kernel": (32, 32),
      "encoder/layer_0/attention/key/kernel": (32, 16),  # 2 kv heads over 4: replicated.
      "encoder/layer_0/ffn/up/kernel": (32, 37),  # 37 columns: tensor dropped, fsdp stays.
      "encoder/layer_0/ffn/gate/kernel": (33, 38),  # Neither fits: fsdp moves to the 38.
      "encoder/embeddings/word_embeddings/embedding": (30522, 32),  # 4 does not divide.
      "opt_state/0/mu/encoder/layer_0/attention/query/kernel": (32, 32),
      "opt_state/0/v_row/encoder/layer_0/attention/query/kernel": (32,),  # Factored: rank 1.
      "encoder/layer_0/attention_norm/scale": (32,),
      "heads/sst2/output/kernel": (32, 2),
    },
    mesh,
    rules,
    Heads(),
  )
  assert got["encoder/layer_0/attention/query/kernel"] == P("fsdp", "tensor")
  assert got["encoder/layer_0/attention/key/kernel"] == P("fsdp")
  assert got["encoder/layer_0/ffn/up/kernel"] == P("fsdp")
  assert got["encoder/layer_0/ffn/gate/kernel"] == P(None, "fsdp")
  assert got["encoder/embeddings/word_embeddings/embedding"] == P(None, "fsdp")
  assert got["opt_state/0/mu/encoder/layer_0/attention/query/kernel"] == P("fsdp", "tensor")
  assert got["opt_state/0/v_row/encoder/layer_0/attention/query/kernel"] == P("fsdp")
  assert got["encoder/layer_0/attention_norm/scale"] == P()
  assert got["heads/sst2/output/kernel"] == P("fsdp")  # MATRIX_SHARDING's True.
  qkv = "encoder/layer_0/attention/qkv/kernel"
  assert specs({qkv: (32, 96)}, mesh, gpt2.SHARDING)[qkv] == P(None, "fsdp")


@pytest.mark.parametrize(
  "name, overrides",
  [
    ("bert", {}),
    ("mpnet", {}),
    ("gpt2", dict(intermediate_size=64)),
    ("qwen2", dict(mlp_bias=True, intermediate_size=64)),  # Every bias the llama rules name.
  ],
)
def test_tensor_parallel_rules_each_match_a_parameter_of_their_family(name, overrides):
  """A typo in a family's rule would silently leave its layer replicated."""
  family = families.family_named(name)
  encoder = family.encoder(family.tiny(**overrides), name="encoder")  # Paths from layer_0/.
  ids = jax.ShapeDtypeStruct((2, 8), np.int32)
  shapes = jax.eval_shape(lambda i: encoder.init(jax.random.key(0), i, i, i * 0), ids)
  leaves = paths.flatten(shapes["params"])
  rules = [r for r in family.sharding_rules if r not in family_lib.MATRIX_SHARDING]
  assert rules and not paths.unused_rules(rules, leaves)
  mesh = mesh_of(1, 2, 4)
  cfg = family.tiny(**overrides)
  got = specs({k: v.shape for k, v in leaves.items()}, mesh, family.sharding_rules, cfg)
  assert got["layer_0/ffn/" + ("up" if name == "qwen2" else "intermediate") + "/kernel"] == P(
    "fsdp", "tensor"
  )
  if name == "mpnet":  # [buckets, heads]: split over heads like the logits it is added to.
    assert got["relative_attention_bias/embedding"] == P("fsdp", "tensor")


def test_tensor_parallel_old_fsdp_rules_and_json_configs_still_work():
  shapes = {"a/kernel": (16, 64), "a/bias": (64,), "b/embedding": (99, 32)}
  old = ((".*kernel", True), (".*embedding", True))
  got = specs(shapes, mesh_of(2, 4, 1), (), fsdp_rules=old)
  assert got == {"a/kernel": P(None, "fsdp"), "a/bias": P(), "b/embedding": P(None, "fsdp")}
  # A tensor axis leaves True rules alone; a config read back from JSON holds lists.
  assert specs(shapes, mesh_of(1, 2, 4), (), fsdp_rules=old)["a/kernel"] == P(None, "fsdp")
  as_json = [[".*kernel", ["fsdp", "tensor"]], [".*embedding", False]]
  got = specs(shapes, mesh_of(1, 2, 4), (), fsdp_rules=as_json)
  assert got == {"a/kernel": P("fsdp", "tensor"), "a/bias": P(), "b/embedding": P()}
  # A size-1 axis is dropped, so a tensor rule on a mesh without tensor parallelism is fsdp.
  got = specs(shapes, mesh_of(4, 2, 1), family_lib.ENCODER_SHARDING, model_config=Heads())
  assert got["a/kernel"] == P(None, "fsdp")  # MATRIX_SHARDING: the largest dim.
  # pmap replicates everything.
  assert set(specs(shapes, mesh_of(8, 1, 1), old, mode="pmap").values()) == {P()}


def test_tensor_parallel_rule_errors_are_loud():
  mesh = mesh_of(1, 2, 4)
  shapes = {"encoder/layer_0/attention/query/kernel": (32, 32)}
  with pytest.raises(ValueError, match="num_heads"):
    specs(shapes, mesh, family_lib.ENCODER_SHARDING)  # No model config to count heads in.
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    specs(shapes, mesh, ((".*", ("fsdp", "model")),))
  with pytest.raises(ValueError, match="named twice"):
    specs(shapes, mesh, ((".*", ("tensor", "tensor")),))
  # Without a tensor axis the head count is not needed.
  assert specs(shapes, mesh_of(4, 2, 1), family_lib.ENCODER_SHARDING) == {
    "encoder/layer_0/attention/query/kernel": P("fsdp")
  }


def test_tensor_parallel_mesh_axes_and_batch_divisibility():
  mesh = mesh_of(2, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  # Neighbouring devices form a tensor group.
  assert [d.id for d in mesh.devices[0, 0]] == [jax.devices()[0].id, jax.devices()[1].id]
  assert parallel.batch_devices(mesh) == 4
  assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
  parallel.check_batch_size(4, mesh)
  with pytest.raises(ValueError, match="4 row shards"):
    parallel.check_batch_size(6, mesh)
  assert parallel.batch_devices(mesh_of(1, 1, 8)) == 1
  cfg = ml_collections.ConfigDict(parallel.default_config())
  cfg.update(tensor=3)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    parallel.make_mesh(cfg)
  cfg.update(tensor=2, mode="pmap")
  with pytest.raises(ValueError, match="pmap"):
    parallel.make_mesh(cfg)


@pytest.mark.slow
def test_tensor_parallel_llama_through_the_trainer_matches_a_replicated_run(tmp_path):
  """configs/sst2_decoder.py:tiny (LoRA on a random GQA Llama) trained by the real trainer on
  (data, fsdp, tensor) = (2, 2, 2) ends at the replicated run's eval metrics."""
  from research.train.trainer import train_and_evaluate

  results = {}
  for name, (fsdp, tensor) in {"replicated": (1, 1), "sharded": (2, 2)}.items():
    config = load_config_module("sst2_decoder").get_config("tiny")
    config.parallel.update(fsdp=fsdp, tensor=tensor)
    results[name] = train_and_evaluate(config, str(tmp_path / name))
  want, got = results["replicated"]["eval"]["sst2"], results["sharded"]["eval"]["sst2"]
  assert results["sharded"]["steps"] == 10 and want.keys() == got.keys()
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)

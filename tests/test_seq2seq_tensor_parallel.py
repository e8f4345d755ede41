"""Tensor parallelism of the pretrained encoder-decoder families on 8 simulated CPU devices.

T5's and BART's sharding rules (their ``Family.sharding_rules``) split what they say (q/k/v of
self- and cross-attention over heads, the feed-forward over its width, T5's relative position
table over heads, the token table over the vocabulary) and change no number: teacher-forced
logits and one real train step (research.train.steps.make_train_step, the seq2seq loss) on a
(data=2, fsdp=2, tensor=2) mesh equal the single-device ones.

The step's optimizer is SGD, an update linear in the gradient, so the comparison measures the
sharded gradient: Adam's first step is ``lr * sign(g)``, which turns the rounding noise of
gradients that are zero in exact arithmetic (pad-token rows, which reach the loss only through
masked positions) into full-size differences.
"""

import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from research import paths
from research.models import families, seq2seq
from research.models.encoder_decoder import bart_modules, t5
from research.train import parallel
from research.train.state import TrainState
from research.train.steps import apply_model, make_train_step

BATCH, SOURCE, TARGET, VOCAB = 8, 12, 9, 128
TOL = 1e-5
# Sizes the tensor axis divides (4 heads, FFN 64, vocabulary 128), so every rule applies.
CONFIGS = {
  # mT5's layout: gated feed-forward (gate/up/down) and an untied lm_head.
  "t5": lambda: t5.tiny("mt5", vocab_size=VOCAB, intermediate_size=64),
  # BART: biased projections, learned positions, the shared table as the output layer.
  "bart": lambda: bart_modules.BartConfig.tiny(
    vocab_size=VOCAB, encoder_ffn_size=64, decoder_ffn_size=64, hidden_dropout=0.0
  ),
}


def batch() -> dict[str, np.ndarray]:
  """Right-padded sources and targets of random lengths, labels the targets shifted left."""
  rng = np.random.default_rng(0)
  src_len, tgt_len = rng.integers(4, SOURCE + 1, BATCH), rng.integers(3, TARGET + 1, BATCH)
  src_mask = (np.arange(SOURCE)[None] < src_len[:, None]).astype(np.int32)
  tgt_mask = (np.arange(TARGET)[None] < tgt_len[:, None]).astype(np.int32)
  targets = rng.integers(3, VOCAB, (BATCH, TARGET + 1)).astype(np.int32)
  labels = np.where(tgt_mask == 1, targets[:, 1:], -100).astype(np.int32)
  return {
    "input_ids": (rng.integers(3, VOCAB, (BATCH, SOURCE)) * src_mask).astype(np.int32),
    "attention_mask": src_mask,
    "decoder_input_ids": (targets[:, :-1] * tgt_mask).astype(np.int32),
    "decoder_attention_mask": tgt_mask,
    "labels": labels,
    "example_mask": np.ones(BATCH, np.float32),
  }


@functools.cache
def run(family: str, mesh_shape: tuple[int, int, int]) -> dict:
  """Logits and one train step of ``family`` on a (data, fsdp, tensor) mesh, the state laid
  out by the family's rules (research.train.parallel.state_shardings)."""
  data, fsdp, tensor = mesh_shape
  cfg = CONFIGS[family]()
  model = seq2seq.make_model(cfg, ("t",))
  host = batch()
  params = model.init(jax.random.key(0), host["input_ids"])["params"]
  tx = optax.sgd(1.0)
  rng = jax.random.key_data(jax.random.key(1))
  create = lambda p: TrainState.create(p, tx, rng)
  settings = ml_collections.ConfigDict(dict(parallel.default_config(), fsdp=fsdp, tensor=tensor))
  mesh = parallel.make_mesh(settings, jax.devices()[: data * fsdp * tensor])
  shardings = parallel.state_shardings(
    jax.eval_shape(create, params),
    mesh,
    settings,
    default_rules=families.family_of(cfg).sharding_rules,
    model_config=cfg,
  )
  state = jax.jit(create, out_shardings=shardings)(params)
  bsharding = parallel.batch_sharding(mesh)
  inputs = parallel.global_batch(host, bsharding)
  logits = jax.jit(
    lambda p, b: apply_model(model, p, b, "t"), in_shardings=(shardings.params, bsharding)
  )(state.params, inputs)
  step = parallel.compile_train_step(
    lambda axis: make_train_step(model, "t", "seq2seq", 1, axis), "jit", mesh, shardings, bsharding
  )
  new, metrics = step(state, inputs)
  return dict(
    logits=np.asarray(logits),
    loss=float(metrics["loss"]),
    params0={k: np.asarray(v) for k, v in paths.flatten(params).items()},
    params={k: np.asarray(v) for k, v in paths.flatten(new.params).items()},
    specs={k: s.spec for k, s in paths.flatten(shardings.params).items()},
  )


def max_diff(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_tensor_parallel_t5_bart_equal_single_device(family):
  ref, got = run(family, (1, 1, 1)), run(family, (2, 2, 2))
  # Relative to the logits' scale: a random mT5's untied lm_head (N(0, 1), as transformers
  # draws it) gives logits up to ~25, whose fp32 sums differ by ~1e-5 in absolute terms.
  scale = float(np.max(np.abs(ref["logits"])))
  assert float(np.max(np.abs(got["logits"] - ref["logits"]))) <= TOL * max(scale, 1.0)
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=TOL)
  assert max_diff(got["params"], ref["params"]) < TOL  # After one step.
  assert max_diff(ref["params"], ref["params0"]) > 1e-3  # The step did move the params.
  assert all(s == P() for s in ref["specs"].values())  # One device: nothing to split.


def _axes(spec: P) -> list:
  return [a if isinstance(a, tuple) else (a,) for a in spec]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_tensor_parallel_t5_bart_rules_split_heads_ffn_and_vocabulary(family):
  specs = run(family, (2, 2, 2))["specs"]
  ffn_in, ffn_out = ("up", "down") if family == "t5" else ("intermediate", "output")
  for side in ("encoder", "decoder"):
    for attention in ("attention", "cross_attention") if side == "decoder" else ("attention",):
      layer = f"{side}/layer_1/{attention}"
      assert specs[f"{layer}/query/kernel"] == P("fsdp", "tensor")
      assert specs[f"{layer}/value/kernel"] == P("fsdp", "tensor")
      assert specs[f"{layer}/output/kernel"] == P("tensor", "fsdp")
    assert specs[f"{side}/layer_0/ffn/{ffn_in}/kernel"] == P("fsdp", "tensor")
    assert specs[f"{side}/layer_0/ffn/{ffn_out}/kernel"] == P("tensor", "fsdp")
  assert specs["encoder/embeddings/word_embeddings/embedding"] == P("tensor", "fsdp")
  if family == "t5":
    for side in ("encoder", "decoder"):
      bias = f"{side}/layer_0/attention/relative_attention_bias/embedding"
      assert specs[bias] == P(None, "tensor")  # [buckets, heads]: over heads.
    assert specs["decoder/layer_0/ffn/gate/kernel"] == P("fsdp", "tensor")
    assert specs["lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["encoder/final_norm/scale"] == P()
  else:
    assert specs["encoder/layer_0/attention/query/bias"] == P("tensor")
    assert specs["decoder/layer_0/cross_attention/key/bias"] == P("tensor")
    assert specs["decoder/layer_0/attention/output/bias"] == P()  # Added after the all-reduce.
    assert specs["final_logits_bias"] == P("tensor")


@pytest.mark.parametrize(
  "family, cfg",
  [
    ("t5", t5.tiny("mt5")),
    ("bart", bart_modules.BartConfig.tiny(tie_word_embeddings=False)),
  ],
)
def test_tensor_parallel_t5_bart_rules_each_match_a_parameter(family, cfg):
  """A typo in a rule would silently leave its layer replicated."""
  model = seq2seq.make_model(cfg, ("t",))
  ids = jax.ShapeDtypeStruct((1, 4), np.int32)
  shapes = jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"]
  rules = [r for r in families.family_named(family).sharding_rules if r[1] is not True]
  assert not paths.unused_rules(rules, paths.flatten(shapes))

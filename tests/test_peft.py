"""Parameter-efficient transfer: LoRA, bottleneck adapters and BitFit on tiny models.

What each method trains (optimizer state, bitwise-frozen rest, analytic counts), that the extra
params start as the identity, LoRA merging and export to transformers, and one tiny real run.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import make_checkpoint, padded_batch, torch_hidden
from train_util import tiny_config

from research import optim, paths
from research.models.config import EncoderConfig
from research.models.encoder import Encoder
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.train.state import TrainState
from research.train.steps import make_train_step
from research.transfer import graft, hf, peft

TINY = EncoderConfig.tiny(hidden_dropout=0.0, attention_dropout=0.0)
HEADS = {"cls": HeadConfig(num_labels=3, dropout=0.0), "tag": HeadConfig("tagging", 5, dropout=0.0)}
LORA_ALL = (  # Fused q/v slices, plain Dense layers (FFN, pooler) and the default targets.
  r"encoder/layer_\d+/attention/(query|value)",
  r"encoder/layer_1/ffn/(intermediate|output)",
  r"encoder/pooler",
)
METHODS = {
  "lora": peft.PeftConfig("lora", lora_rank=4, lora_dropout=0.1, lora_targets=LORA_ALL),
  "adapter_houlsby": peft.PeftConfig("adapters", adapter_size=8),
  "adapter_pfeiffer": peft.PeftConfig("adapters", adapter_size=8, adapter_placement="pfeiffer"),
  "bitfit": peft.PeftConfig("bitfit"),
}


def batch(vocab: int = TINY.vocab_size) -> dict:
  ids, mask = padded_batch(0, vocab=vocab)
  return {
    "input_ids": ids,
    "attention_mask": mask,
    "token_type_ids": np.zeros_like(ids),
    "labels": np.array([0, 1, 2], np.int32),
    "example_mask": np.ones(3, np.float32),
  }


def build(peft_cfg, encoder=TINY):
  model = make_task_model(encoder.replace(peft=peft_cfg), HEADS)
  return model, init_params(model, jax.random.key(0))


def peft_leaves(params) -> dict:
  return {p: x for p, x in paths.flatten(params).items() if "lora_" in p or "adapter" in p}


def strip_peft(params):
  return paths.unflatten(
    {p: x for p, x in paths.flatten(params).items() if "lora_" not in p and "adapter" not in p}
  )


def _matches(pattern: str, path: str) -> bool:
  return paths.match([(pattern, True)], path, False)


def redraw(params, pattern: str, scale: float = 0.1, seed: int = 1):
  """``params`` with the leaves matching ``pattern`` redrawn (LoRA B / adapter up start at 0)."""
  rng = np.random.default_rng(seed)
  return paths.map_with_path(
    lambda p, x: jnp.asarray(rng.normal(0, scale, x.shape), x.dtype) if _matches(pattern, p) else x,
    params,
  )


def logits(model, params, tasks, vocab: int = TINY.vocab_size):
  b = batch(vocab)
  apply = jax.jit(model.apply, static_argnames="tasks")
  out = apply({"params": params}, b["input_ids"], b["attention_mask"], tasks=tasks)
  return {t: np.asarray(v) for t, v in out.items()}


# --- identity at init ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "adapter_houlsby", "adapter_pfeiffer"])
def test_lora_and_adapter_init_equals_base_model(name):
  model, params = build(METHODS[name])
  base_model, _ = build(None)
  base = strip_peft(params)
  # Added leaves on TINY's 2 layers: LoRA a/b on q, v (x2 layers), layer_1's FFN and the pooler;
  # down/up kernel/bias per adapter, two adapters a layer (Houlsby) or one (Pfeiffer).
  counts = {"lora": 14, "adapter_houlsby": 16, "adapter_pfeiffer": 8}
  assert len(peft_leaves(params)) == counts[name] and peft_leaves(base) == {}
  # 'cls' alone runs the first-token-only last layer; 'tag' the full sequence. LoRA adds an
  # exact zero; an adapter's zero lets XLA fuse the LayerNorm after it differently (~1e-9).
  atol = 0.0 if name == "lora" else 1e-6
  for tasks in (("cls",), ("tag",)):
    ours, theirs = logits(model, params, tasks), logits(base_model, base, tasks)
    for t in tasks:
      np.testing.assert_allclose(ours[t], theirs[t], rtol=0, atol=atol, err_msg=f"{name} {t}")


def test_lora_params_sit_beside_targeted_kernels():
  _, params = build(METHODS["lora"])
  flat = paths.flatten(params)
  modules = sorted({p.rsplit("/", 1)[0] for p in peft_leaves(params)})
  expected = [f"encoder/layer_{i}/attention/{n}" for i in (0, 1) for n in ("query", "value")]
  expected += ["encoder/layer_1/ffn/intermediate", "encoder/layer_1/ffn/output", "encoder/pooler"]
  assert modules == sorted(expected)
  assert flat["encoder/layer_1/ffn/intermediate/lora_a"].shape == (32, 4)
  assert flat["encoder/layer_1/ffn/intermediate/lora_b"].shape == (4, 64)
  assert not np.any(flat["encoder/pooler/lora_b"]) and np.any(flat["encoder/pooler/lora_a"])
  # A bare Encoder matches the same targets (its paths read as under 'encoder/').
  cfg = TINY.replace(peft=METHODS["lora"])
  bare = Encoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert {f"encoder/{p}" for p in peft_leaves(bare)} == set(peft_leaves(params))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapter_paths_follow_the_placement(placement):
  _, params = build(peft.PeftConfig("adapters", adapter_size=8, adapter_placement=placement))
  names = ("attention_adapter", "ffn_adapter") if placement == "houlsby" else ("ffn_adapter",)
  expected = [f"encoder/layer_{i}/{n}" for i in (0, 1) for n in names]
  assert peft.adapter_paths(paths.flatten(params)) == sorted(expected)
  flat = paths.flatten(params)
  assert flat["encoder/layer_1/ffn_adapter/down/kernel"].shape == (32, 8)
  assert flat["encoder/layer_1/ffn_adapter/up/kernel"].shape == (8, 32)


# --- what trains --------------------------------------------------------------------------


def train(model, params, rules, steps=3, vocab=TINY.vocab_size):
  cfg = optim.default_config()
  cfg.update(trainable=rules, lr=1e-2, warmup_fraction=0.0, schedule="constant")
  tx, summary = optim.build(cfg, params, steps)
  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(1)))
  step = jax.jit(make_train_step(model, "cls", "classification"))
  for _ in range(steps):
    state, metrics = step(state, batch(vocab))
  assert np.isfinite(float(metrics["loss"]))
  labels = optim.freeze_labels(cfg, params)
  return state, summary, optim.count_params(params, labels)


TRAINED = {  # What each method trains besides the heads, as a predicate on the leaf path.
  "lora": lambda p: "/lora_" in p,
  "adapter_houlsby": lambda p: "adapter" in p or p.endswith(("norm/scale", "norm/bias")),
  "adapter_pfeiffer": lambda p: "adapter" in p or p.endswith(("norm/scale", "norm/bias")),
  "bitfit": lambda p: p.startswith("encoder/") and p.endswith("/bias"),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_lora_adapter_bitfit_train_only_their_params(name):
  cfg = METHODS[name]
  model, params = build(cfg)
  if name == "lora":  # Nonzero B, so the gradient reaches A too.
    params = redraw(params, ".*lora_b", scale=0.01)
  rules = peft.trainable_rules(cfg, ["cls"])
  trains = lambda p: p.startswith("heads/cls/") or TRAINED[name](p)
  state, summary, counts = train(model, params, rules)

  # Frozen leaves have no optimizer moments; every trainable one has them.
  opt_paths = list(paths.flatten(state.opt_state))
  with_state = {p for p in paths.flatten(params) if any(o.endswith("/" + p) for o in opt_paths)}
  assert with_state == {p for p in paths.flatten(params) if trains(p)}

  before, after = paths.flatten(params), paths.flatten(state.params)
  for p, x in before.items():
    if trains(p) and not p.endswith("attention/key/bias"):  # Softmax ignores it: no gradient.
      assert np.any(np.asarray(after[p]) != np.asarray(x)), f"{p} did not move"
    elif not trains(p):
      np.testing.assert_array_equal(after[p], x, err_msg=f"{p} is frozen but moved")

  heads = optim.count_params(params["heads"]["cls"])["total"]
  expected = peft.analytic_trainable_count(TINY, cfg, heads)
  assert counts["trainable"] == expected
  assert summary[-1] == f"params: {counts['total']:,} total, {expected:,} trainable"


def test_bitfit_and_none_counts_cover_electra_projection():
  electra = TINY.replace(embedding_size=16, use_pooler=False)
  ids = jnp.zeros((1, 4), jnp.int32)
  flat = paths.flatten({"encoder": Encoder(electra).init(jax.random.key(0), ids)["params"]})
  assert "encoder/embeddings/projection/bias" in flat
  for cfg, rule in ((peft.PeftConfig("bitfit"), ".*bias"), (peft.PeftConfig(), ".*")):
    counted = sum(x.size for p, x in flat.items() if _matches(rule, p))
    assert peft.analytic_trainable_count(electra, cfg, 0) == counted, cfg.method


def test_lora_analytic_count_formula():
  cfg = peft.PeftConfig("lora", lora_rank=8)  # Default targets: query and value.
  minilm = EncoderConfig(hidden_size=384, num_layers=6)
  assert peft.analytic_trainable_count(minilm, cfg, 770) == 6 * 2 * 8 * (384 + 384) + 770


# --- LoRA merge and export ----------------------------------------------------------------


def test_lora_merge_equals_unmerged():
  cfg = METHODS["lora"]
  model, params = build(cfg)
  params = redraw(redraw(params, ".*lora_b"), ".*lora_a", seed=2)
  merged = peft.merge_lora(params, cfg)
  assert not peft_leaves(merged)
  assert set(paths.flatten(merged)) == set(paths.flatten(strip_peft(params)))
  base_model, _ = build(None)
  for tasks in (("cls",), ("tag",)):
    ours, theirs = logits(model, params, tasks), logits(base_model, merged, tasks)
    for t in tasks:
      assert np.max(np.abs(ours[t] - theirs[t])) < 1e-5, t
      assert np.max(np.abs(ours[t] - logits(base_model, strip_peft(params), tasks)[t])) > 1e-3


def test_lora_merged_export_loads_in_transformers(tmp_path):
  source = make_checkpoint("bert", tmp_path / "src")
  hf_cfg, pretrained = hf.load_pretrained(source)
  cfg = peft.PeftConfig("lora", lora_rank=4, lora_targets=LORA_ALL)
  lora_cfg = hf_cfg.replace(peft=cfg)
  ids, mask = padded_batch(hf_cfg.pad_token_id)
  init = Encoder(lora_cfg).init(jax.random.key(0), jnp.asarray(ids))["params"]
  params, report = graft.graft({"encoder": init}, pretrained)
  assert sorted(report.left_at_init) == sorted(peft_leaves({"encoder": init}))
  assert not report.unused_in_source

  def hidden(cfg_, p):
    out = Encoder(cfg_).apply({"params": p["encoder"]}, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out["hidden_states"])

  valid = mask.astype(bool)
  theirs = torch_hidden(source, ids, mask)[valid]
  assert np.max(np.abs(hidden(lora_cfg, params)[valid] - theirs)) < 1e-5  # Identity at init.

  params = redraw(redraw(params, ".*lora_b"), ".*lora_a", seed=2)
  with pytest.raises(hf.CheckpointError, match=r"lora_a.*merge_lora"):
    hf.save_pretrained(tmp_path / "unmerged", hf_cfg, params)
  merged = peft.merge_lora(params, cfg)
  out = hf.save_pretrained(tmp_path / "merged", hf_cfg, merged)
  unmerged_h, merged_h = hidden(lora_cfg, params)[valid], hidden(hf_cfg, merged)[valid]
  exported = torch_hidden(out, ids, mask)[valid]
  assert np.max(np.abs(exported - merged_h)) < 1e-5
  assert np.max(np.abs(exported - unmerged_h)) < 1e-5
  assert np.max(np.abs(exported - theirs)) > 1e-3  # The LoRA update is really in the weights.


def test_adapter_export_is_refused_naming_the_adapters(tmp_path):
  _, params = build(METHODS["adapter_pfeiffer"])
  with pytest.raises(hf.CheckpointError, match="adapters cannot be exported") as e:
    hf.save_pretrained(tmp_path, TINY, params)
  assert "encoder/layer_0/ffn_adapter" in str(e.value)


# --- config -------------------------------------------------------------------------------


def test_lora_config_from_base_config_and_errors():
  from research import config_lib

  c = config_lib.base_config()
  assert peft.from_config(c.model.peft) == peft.PeftConfig()
  c.model.peft.update(method="lora", lora_rank=2)
  assert peft.from_config(c.model.peft).lora_scale == 8.0
  with pytest.raises(ValueError, match="unknown field"):
    peft.from_config({"method": "lora", "rank": 2})
  with pytest.raises(ValueError, match="method='lorra'"):
    peft.from_config({"method": "lorra"})
  typo = peft.PeftConfig("lora", lora_targets=(r"encoder/layers_\d+/attention/query",))
  with pytest.raises(ValueError, match=r"lora_targets: .*match no projection"):
    peft.lora_modules(TINY, typo)
  assert peft.trainable_rules(peft.PeftConfig(), ["cls"]) == ()


def test_lora_tiny_trainer_run_counts_match_analytic(tmp_path):
  from research.train.state import encoder_config
  from research.train.trainer import train_and_evaluate

  config = tiny_config(steps=4, log_every=2, eval_every=4, checkpoint_every=0)
  config.model.peft.update(method="lora", lora_rank=2)
  before = config.to_json()
  results = train_and_evaluate(config, str(tmp_path))
  assert config.to_json() == before  # The run derives LoRA's trainable rules, config unchanged.
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["trainable"] == []
  saved = json.loads((tmp_path / "results.json").read_text())
  encoder = encoder_config(config.model)  # The MiniLM vocabulary, a tiny 2-layer body.
  head = 32 * 2 + 2  # heads/sst2/output: [hidden, 2 labels] + bias.
  expected = peft.analytic_trainable_count(encoder, encoder.peft, head)
  assert expected == 2 * 2 * 2 * (32 + 32) + head
  assert saved["params"]["trainable"] == results["params"]["trainable"] == expected
  summary = (tmp_path / "optim_summary.txt").read_text().splitlines()[-1]
  assert summary.endswith(f"{expected:,} trainable")
  assert "sst2" in saved["eval"]


# --- LoRA on the decoder-only families ----------------------------------------------------

DECODER_TARGETS = {  # Every projection of the family: attention and MLP.
  "gpt2": (r"encoder/layer_\d+/attention/(qkv|output)", r"encoder/layer_\d+/ffn/.*"),
  "llama": (r"encoder/layer_\d+/attention/.*", r"encoder/layer_\d+/ffn/(gate|up|down)"),
  "qwen2": (r"encoder/layer_\d+/attention/(query|key|value|output)", r"encoder/layer_1/ffn/up"),
  "gemma": (r"encoder/layer_\d+/attention/(query|value)",),  # The default q/v targets.
}
DECODER_HEADS = {"cls": HeadConfig(num_labels=3, pooling="last", dropout=0.0)}


def decoder(family: str, peft_cfg):
  from research.models import families

  cfg = families.family_named(family).tiny(hidden_dropout=0.0, attention_dropout=0.0)
  model = make_task_model(cfg.replace(peft=peft_cfg), DECODER_HEADS)
  return cfg, model, init_params(model, jax.random.key(0))


@pytest.mark.parametrize("family", list(DECODER_TARGETS))
def test_lora_on_decoder_family_starts_as_base_and_trains_only_lora(family):
  """gpt2 / llama / qwen2 / gemma: LoRA beside exactly the targeted projections, the first
  forward bitwise the base model's (B = 0), then only A, B and the head move."""
  cfg_peft = peft.PeftConfig("lora", lora_rank=4, lora_targets=DECODER_TARGETS[family])
  cfg, model, params = decoder(family, cfg_peft)
  base_model = make_task_model(cfg, DECODER_HEADS)
  targets = peft.lora_modules(cfg, cfg_peft)
  flat = paths.flatten(params)
  assert sorted({p.rsplit("/", 1)[0] for p in peft_leaves(params)}) == sorted(targets)
  for module, (n_in, n_out) in targets.items():
    assert flat[f"{module}/lora_a"].shape == (n_in, 4) and np.any(flat[f"{module}/lora_a"])
    assert flat[f"{module}/lora_b"].shape == (4, n_out) and not np.any(flat[f"{module}/lora_b"])
  vocab = cfg.vocab_size
  ours = logits(model, params, ("cls",), vocab)["cls"]
  plain = logits(base_model, strip_peft(params), ("cls",), vocab)["cls"]
  # B = 0 adds an exact zero; XLA may fuse the sum differently from the plain matmul (~1e-8).
  np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-6)

  params = redraw(params, ".*lora_b", scale=0.01)  # Nonzero B, so the gradient reaches A too.
  state, _, counts = train(model, params, peft.trainable_rules(cfg_peft, ["cls"]), vocab=vocab)
  before, after = paths.flatten(params), paths.flatten(state.params)
  for p, x in before.items():
    if "/lora_" in p or p.startswith("heads/cls/"):
      assert np.any(np.asarray(after[p]) != np.asarray(x)), f"{p} did not move"
    else:
      np.testing.assert_array_equal(after[p], x, err_msg=f"{p} is frozen but moved")
  heads = optim.count_params(params["heads"]["cls"])["total"]
  assert counts["trainable"] == peft.analytic_trainable_count(cfg, cfg_peft, heads)


def test_lora_merge_on_llama_equals_unmerged():
  cfg_peft = peft.PeftConfig("lora", lora_rank=4, lora_targets=DECODER_TARGETS["llama"])
  cfg, model, params = decoder("llama", cfg_peft)
  params = redraw(redraw(params, ".*lora_b"), ".*lora_a", seed=2)
  merged = peft.merge_lora(params, cfg_peft)
  base = make_task_model(cfg, DECODER_HEADS)
  ours = logits(model, params, ("cls",), cfg.vocab_size)["cls"]
  theirs = logits(base, merged, ("cls",), cfg.vocab_size)["cls"]
  plain = logits(base, strip_peft(params), ("cls",), cfg.vocab_size)["cls"]
  assert np.max(np.abs(ours - theirs)) < 1e-5 and np.max(np.abs(ours - plain)) > 1e-3


def test_peft_errors_on_gpt2_name_its_projections_and_refuse_adapters():
  from research.models import families

  cfg = families.family_named("gpt2").tiny()
  with pytest.raises(ValueError, match=r"match no projection.*encoder/layer_N/attention/qkv"):
    peft.lora_modules(cfg, peft.PeftConfig("lora"))  # Default q/v targets: GPT-2 fuses them.
  with pytest.raises(ValueError, match="'adapters' is not implemented for the gpt2 family"):
    cfg.replace(peft=peft.PeftConfig("adapters"))
  llama = families.family_named("llama").tiny()
  with pytest.raises(ValueError, match="'adapters' is not implemented for the llama family"):
    llama.replace(peft=peft.PeftConfig("adapters"))

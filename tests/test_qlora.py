"""QLoRA (an NF4 base under LoRA) and DoRA on the decoder-only families (names carry ``qlora`` or
``dora``): storage, quantising after loading, training with the base frozen, parity with peft's
DoRA on a transformers Llama, merging, and the memory benchmark's tiny mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import padded_batch

from research import optim, paths
from research.models import families
from research.models import peft_layers as pl
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.train.state import TrainState
from research.train.steps import make_train_step
from research.transfer import hf, peft

ALL = (r"encoder/layer_\d+/attention/.*", r"encoder/layer_\d+/ffn/(gate|up|down)")
# Intermediate 64: with hidden 32 every projection's size is a multiple of the 64-weight block.
LLAMA = dict(
  vocab_size=99,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  pad_token_id=0,
)
HEADS = {"cls": HeadConfig(num_labels=3, pooling="last", dropout=0.0)}
QLORA = peft.PeftConfig("lora", lora_rank=4, lora_targets=ALL, quantize="nf4")


def tiny_llama(peft_cfg):
  cfg = families.family_named("llama").tiny(intermediate_size=64, hidden_dropout=0.0)
  cfg = cfg.replace(peft=peft_cfg)
  model = make_task_model(cfg, HEADS)
  return cfg, model, init_params(model, jax.random.key(0))


def batch(vocab: int = 99) -> dict:
  ids, mask = padded_batch(0, vocab=vocab)
  return {
    "input_ids": ids,
    "attention_mask": mask,
    "token_type_ids": np.zeros_like(ids),
    "labels": np.array([0, 1, 2], np.int32),
    "example_mask": np.ones(3, np.float32),
  }


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A random transformers LlamaForCausalLM (weights moved off their init) saved once."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.02 * torch.randn_like(param))
  directory = tmp_path_factory.mktemp("llama")
  model.save_pretrained(directory)
  return directory


def test_qlora_stores_every_projection_in_nf4_and_trains_only_lora():
  """Codes uint8 ``[in, out/2]`` in place of each kernel; one jitted step trains A, B and the
  head; the NF4 leaves get no optimizer state and stay bitwise; integer grads never appear."""
  cfg, model, params = tiny_llama(QLORA)
  flat = paths.flatten(params)
  modules = {m: s for m, s in peft.dense_modules(cfg).items() if "/layer_" in m}
  assert len(modules) == 2 * 7
  assert flat["encoder/lm_head/kernel"].dtype == jnp.float32  # As transformers' 4-bit loading.
  for module, shape in modules.items():
    assert f"{module}/kernel" not in flat
    codes = flat[f"{module}/kernel_nf4/codes"]
    assert codes.dtype == jnp.uint8 and codes.shape == (shape[0], shape[1] // 2)
    assert flat[f"{module}/kernel_nf4/absmax"].dtype == jnp.uint8
  params = paths.map_with_path(  # Nonzero B, so A gets a gradient too.
    lambda p, x: x + 0.01 if p.endswith("lora_b") else x, params
  )
  cfg_opt = optim.default_config()
  cfg_opt.update(trainable=peft.trainable_rules(QLORA, ["cls"]), lr=1e-2, warmup_fraction=0.0)
  tx, _ = optim.build(cfg_opt, params, 3)
  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(1)))
  opt_sizes = sorted(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert not any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state.opt_state))
  trainable = sum(np.size(x) for p, x in flat.items() if "lora_" in p or p.startswith("heads/"))
  assert sum(opt_sizes) <= 2 * trainable + 8  # Adam's two moments and counters, nothing else.
  step = jax.jit(make_train_step(model, "cls", "classification"), donate_argnums=0)
  before = {p: np.asarray(x) for p, x in paths.flatten(params).items()}
  for _ in range(3):
    state, metrics = step(state, batch())
  assert step._cache_size() == 1 and np.isfinite(float(metrics["loss"]))
  after = paths.flatten(state.params)
  for path, value in before.items():
    moved = np.any(np.asarray(after[path]) != value)
    assert moved == ("lora_" in path or path.startswith("heads/")), path


def test_qlora_quantises_after_loading_within_nf4_error_and_stays_close(llama_dir):
  """peft.graft on an HF Llama: each kernel quantised from the loaded weights (within NF4's
  blockwise bound of them), and the quantised model's logits near the float model's."""
  cfg, source = hf.load_pretrained(llama_dir)
  family = families.family_of(cfg)
  lora = peft.PeftConfig("lora", lora_rank=4, lora_targets=ALL)
  outs = {}
  for name, peft_cfg in {"float": lora, "nf4": QLORA}.items():
    model = make_task_model(cfg.replace(peft=peft_cfg), HEADS)
    target = init_params(model, jax.random.key(0))
    grafted, report = peft.graft(target, source, family.graft_rules)
    assert not report.unused_in_source
    outs[name] = (model, grafted, report)
  _, params, report = outs["nf4"]
  flat, src = paths.flatten(params), paths.flatten(source)
  assert ("encoder/layer_0/ffn/down/kernel_nf4", "encoder/layer_0/ffn/down/kernel") in (
    report.transferred
  )
  half_gap = np.max(np.diff(pl.NF4_CODE)) / 2
  for module in [m for m in peft.dense_modules(cfg) if "/layer_" in m]:
    stored = {k: flat[f"{module}/kernel_nf4/{k}"] for k in ("codes", "absmax", "scale", "offset")}
    w = np.asarray(src[f"{module}/kernel"], np.float32)
    back = np.asarray(pl.nf4_dequantize(stored, pl.nf4_shape(stored)))
    blocks, err = w.reshape(-1, 64), np.abs(back - w).reshape(-1, 64)
    bound = half_gap * np.abs(blocks).max(axis=1, keepdims=True) * 1.01 + 1e-7
    assert np.all(err <= bound), module
  ids, mask = padded_batch(0)
  real = mask.astype(bool)
  lm = {}
  for name, (model, params, _) in outs.items():
    enc = families.family_of(model.encoder).encoder(model.encoder)
    out = enc.apply({"params": params["encoder"]}, ids, mask, return_logits=True)
    lm[name] = np.asarray(out["logits"])[real]
  rel = np.linalg.norm(lm["nf4"] - lm["float"]) / np.linalg.norm(lm["float"])
  print(f"qlora logits relative error {rel:.4f}")  # 0.096 here.
  # NF4's relative RMS error per weight is ~0.1 (test_nf4); two layers do not compound it much.
  assert 0 < rel < 0.15


def test_qlora_sst2_decoder_config_trains_through_the_trainer_with_the_base_bitwise(
  minilm_dir, tmp_path
):
  """configs/sst2_decoder.py:tiny,peft=qlora,checkpoint=DIR through train_and_evaluate: the
  base is quantised from the checkpoint at graft, and after training its codes are bitwise those
  of quantising the checkpoint; LoRA moved."""
  from hf_tiny import llama_checkpoint
  from train_util import load_config_module

  from research.train import checkpoints
  from research.train.trainer import train_and_evaluate

  sizes = dict(LLAMA, vocab_size=30522)
  checkpoint = llama_checkpoint(sizes, minilm_dir, tmp_path / "llama")
  run = load_config_module("sst2_decoder").get_config(f"tiny,peft=qlora,checkpoint={checkpoint}")
  results = train_and_evaluate(run, str(tmp_path / "run"))
  assert results["steps"] == run.train.steps
  _, source = hf.load_pretrained(checkpoint)
  trained, _ = checkpoints.load_params(tmp_path / "run", prefer="latest")
  flat, src = paths.flatten(trained), paths.flatten(source)
  module = "encoder/layer_1/attention/output"
  expected = pl.nf4_quantize(np.asarray(src[f"{module}/kernel"]))
  for key, value in expected.items():
    np.testing.assert_array_equal(flat[f"{module}/kernel_nf4/{key}"], value, err_msg=key)
  assert np.any(flat["encoder/layer_0/attention/query/lora_b"] != 0)
  report = (tmp_path / "run" / "graft_report.txt").read_text()
  assert "encoder/layer_0/ffn/gate/kernel_nf4" in report


def test_dora_equals_peft_dora_on_a_transformers_llama(llama_dir):
  """Our DoRA on the same base, A, B and magnitudes as peft's ``use_dora=True`` LoRA: logits
  within 1e-5; at init (B = 0, magnitude = ||W||) DoRA is the base model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft_lib = pytest.importorskip("peft")
  from research.transfer import peft_format

  cfg, source = hf.load_pretrained(llama_dir)
  dora = peft.PeftConfig("lora", lora_rank=4, lora_alpha=8.0, lora_targets=ALL, use_dora=True)
  cfg = cfg.replace(peft=dora)
  base = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
  targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  their_cfg = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
  theirs = peft_lib.get_peft_model(base, their_cfg).eval()
  enc = families.family_of(cfg).encoder(cfg)
  ids, mask = padded_batch(0)
  init = init_params(make_task_model(cfg, HEADS), jax.random.key(0))
  params, _ = peft.graft(init, source, families.family_of(cfg).graft_rules)
  flat = dict(paths.flatten(params))
  names = peft_format.lora_module_names(cfg)
  modules = dict(theirs.named_modules())
  torch.manual_seed(1)
  for module in peft.lora_modules(cfg, dora):
    layer = modules[f"base_model.model.{names[module]}"]
    with torch.no_grad():  # Move B and m off their init, so every DoRA term counts.
      layer.lora_B["default"].weight.normal_(0, 0.05)
      magnitude = layer.lora_magnitude_vector["default"].weight
      np.testing.assert_allclose(flat[f"{module}/lora_magnitude"], magnitude.numpy(), rtol=1e-6)
      magnitude.mul_(1 + 0.1 * torch.randn_like(magnitude))
    flat[f"{module}/lora_a"] = jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T)
    flat[f"{module}/lora_b"] = jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T)
    flat[f"{module}/lora_magnitude"] = jnp.asarray(magnitude.detach().numpy())
  params = paths.unflatten(flat)
  out = enc.apply({"params": params["encoder"]}, ids, mask, return_logits=True)
  with torch.no_grad():
    args = dict(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
    want = theirs(**args).logits.numpy()
  real = mask.astype(bool)
  diff = np.max(np.abs(np.asarray(out["logits"])[real] - want[real]))
  print(f"dora vs peft max |logit diff| {diff:.2e}")
  assert diff < 1e-5
  merged = peft.merge_lora(params, dora)  # DoRA folded: the plain Llama gives the same logits.
  plain = families.family_of(cfg).encoder(cfg.replace(peft=None))
  folded = plain.apply({"params": merged["encoder"]}, ids, mask, return_logits=True)
  assert np.max(np.abs(np.asarray(folded["logits"])[real] - want[real])) < 1e-5


def test_dora_and_qlora_trainable_counts_and_merge_of_an_nf4_base():
  """DoRA adds ``out`` trainable magnitudes per target; merging a QLoRA tree dequantises every
  NF4 kernel (LoRA target or not) to the plain architecture's float tree."""
  cfg, model, params = tiny_llama(dataclasses.replace(QLORA, use_dora=True))
  cfg_opt = optim.default_config()
  cfg_opt.trainable = peft.trainable_rules(cfg.peft, ["cls"])
  counts = optim.count_params(params, optim.freeze_labels(cfg_opt, params))
  heads = optim.count_params(params["heads"]["cls"])["total"]
  assert counts["trainable"] == peft.analytic_trainable_count(cfg, cfg.peft, heads)
  merged = peft.merge_lora(params, cfg.peft)
  plain = make_task_model(cfg.replace(peft=None), HEADS)
  want = jax.eval_shape(lambda: init_params(plain, jax.random.key(0)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), merged) == jax.tree.map(
    lambda x: (x.shape, x.dtype), want
  )
  b = batch()
  ours = model.apply({"params": params}, b["input_ids"], b["attention_mask"], tasks=("cls",))
  folded = plain.apply({"params": merged}, b["input_ids"], b["attention_mask"], tasks=("cls",))
  np.testing.assert_allclose(ours["cls"], folded["cls"], rtol=0, atol=1e-5)


def test_qlora_and_dora_config_errors_and_integer_leaves_refuse_to_train():
  with pytest.raises(ValueError, match="quantize='int4': expected one of"):
    peft.PeftConfig("lora", quantize="int4")
  with pytest.raises(ValueError, match="build on LoRA; method='bitfit'"):
    peft.PeftConfig("bitfit", use_dora=True)
  _, _, params = tiny_llama(QLORA)
  cfg_opt = optim.default_config()
  cfg_opt.trainable = (".*",)
  with pytest.raises(ValueError, match=r"integer leaves cannot train.*kernel_nf4/absmax"):
    optim.build(cfg_opt, params, 3)
  assert peft.trainable_rules(QLORA, ["cls"])[0] == r".*lora_(a|b|magnitude)"


def test_qlora_memory_benchmark_runs_tiny():
  """``python -m research.bench.qlora_memory --tiny``: both storages in their own subprocess,
  the figures and the ratio line printed (the 0.5B figure is in docs/benchmarks.md)."""
  import subprocess
  import sys

  from research.subprocess_env import child_env

  cmd = [sys.executable, "-m", "research.bench.qlora_memory", "--tiny"]
  proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].startswith("nf4_over_bf16_peak=") and float(lines[-1].split("=")[1]) > 0
  assert any(line.startswith("nf4: params") for line in lines)

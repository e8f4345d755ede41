"""LoRA adapters and their classification head in the HF-PEFT format, both ways, against the
``peft`` library itself on tiny random transformers models (Llama and GPT-2's fused Conv1D).

Export: our LoRA (non-zero A and B) and head, written by research.transfer.peft_format, loaded
with ``peft.PeftModel.from_pretrained`` onto transformers' ``*ForSequenceClassification``: its
logits equal ours. Import: an adapter ``peft`` made and saved loads into our model with equal
logits. Test names carry ``peft_format`` and the family, for ``pytest -k``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import paths
from research.models import families
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.transfer import graft, hf, peft_format
from research.transfer import peft as peft_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-5
VOCAB, PAD, LABELS = 99, 0, 3
SIZES = dict(vocab_size=VOCAB, pad_token_id=PAD, num_labels=LABELS)
CASES = {  # family -> (config class, causal LM, classifier, config kwargs, our targets, peft's)
  "llama": (
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    dict(
      SIZES,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
    ),
    (r"encoder/layer_\d+/attention/(query|value)", r"encoder/layer_1/ffn/(gate|down)"),
    ["q_proj", "v_proj", "gate_proj"],
  ),
  "gpt2": (
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2ForSequenceClassification",
    dict(SIZES, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    (r"encoder/layer_\d+/attention/qkv", r"encoder/layer_\d+/ffn/output"),
    ["c_attn", "mlp.c_proj"],
  ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """``family -> checkpoint directory``: a random causal LM saved by transformers."""
  made = {}

  def get(family: str):
    if family not in made:
      config_cls, lm_cls, _, kwargs, _, _ = CASES[family]
      torch.manual_seed(0)
      model = getattr(transformers, lm_cls)(getattr(transformers, config_cls)(**kwargs))
      with torch.no_grad():  # Norm weights and biases start at 1 or 0: move them.
        for p in model.parameters():
          p.add_(0.1 * torch.randn_like(p))
      directory = tmp_path_factory.mktemp(family)
      model.save_pretrained(directory)
      made[family] = directory
    return made[family]

  return get


def batch(side: str = "right"):
  rng = np.random.default_rng(0)
  ids, mask = np.full((3, 9), PAD, np.int32), np.zeros((3, 9), np.int32)
  for i, n in enumerate([9, 3, 6]):
    cols = slice(0, n) if side == "right" else slice(9 - n, 9)
    ids[i, cols], mask[i, cols] = rng.integers(3, VOCAB, n), 1
  return ids, mask


def our_logits(cfg, peft_cfg, params, side):
  model = make_task_model(cfg.replace(peft=peft_cfg), {"sst": head()})
  ids, mask = batch(side)
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["sst"])


def head(labels: int = LABELS):
  return HeadConfig(num_labels=labels, pooling="last", dropout=0.0)


def hf_classifier(family, directory, labels: int = LABELS):
  """transformers' classifier on the base weights (its ``score`` left at random init)."""
  cls = getattr(transformers, CASES[family][2])
  torch.manual_seed(5)
  return cls.from_pretrained(str(directory), num_labels=labels, pad_token_id=PAD).eval()


def torch_logits(model, side):
  ids, mask = batch(side)
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
  return out.logits.numpy()


def our_params(cfg, peft_cfg, pretrained):
  """A TaskModel tree: the base grafted, LoRA A and B and the head's kernel drawn non-zero."""
  model = make_task_model(cfg.replace(peft=peft_cfg), {"sst": head()})
  params, _ = graft.graft(init_params(model, jax.random.key(0)), pretrained)
  rng = np.random.default_rng(3)

  def draw(path, x):
    if path.endswith(("lora_a", "lora_b")) or path == "heads/sst/output/kernel":
      return jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
    return x

  return paths.map_with_path(draw, params)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(CASES))
def test_peft_format_export_loads_in_peft_with_equal_logits(base, tmp_path, family, side):
  directory = base(family)
  cfg, pretrained = hf.load_pretrained(directory)
  peft_cfg = peft_lib.PeftConfig(
    "lora", lora_rank=4, lora_alpha=12.0, lora_targets=CASES[family][4]
  )
  params = our_params(cfg, peft_cfg, pretrained)
  out = peft_format.export_adapter(tmp_path / "adapter", cfg, peft_cfg, params, "sst", "base")
  config = json.loads((out / peft_format.ADAPTER_CONFIG).read_text())
  assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["score"]
  assert config["r"] == 4 and config["lora_alpha"] == 12.0 and config["task_type"] == "SEQ_CLS"
  assert config["fan_in_fan_out"] == (family == "gpt2")  # GPT-2's Conv1D stores [in, out].

  loaded = peft.PeftModel.from_pretrained(hf_classifier(family, directory), str(out)).eval()
  ours = our_logits(cfg, peft_cfg, params, side)
  theirs = torch_logits(loaded, side)
  print(f"{family} {side}: peft_format export max |diff| {np.max(np.abs(ours - theirs)):.2e}")
  np.testing.assert_allclose(theirs, ours, atol=TOL)
  without = our_logits(cfg, None, peft_lib.merge_lora(params, peft_cfg), side)
  np.testing.assert_allclose(without, ours, atol=TOL)  # Merged: the same function.
  plain = paths.unflatten({p: x for p, x in paths.flatten(params).items() if "lora_" not in p})
  assert np.max(np.abs(our_logits(cfg, None, plain, side) - ours)) > 1e-3  # LoRA matters.


@pytest.mark.parametrize("family", list(CASES))
def test_peft_format_import_of_a_peft_saved_adapter_gives_equal_logits(base, tmp_path, family):
  directory = base(family)
  lora = (
    peft.LoraConfig(
      task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=CASES[family][5], fan_in_fan_out=True
    )
    if family == "gpt2"
    else peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=CASES[family][5])
  )
  model = peft.get_peft_model(hf_classifier(family, directory), lora)
  torch.manual_seed(7)
  with torch.no_grad():  # peft starts B at 0: draw it so the adapter changes the logits.
    for name, p in model.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.copy_(0.2 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "saved")
  expected = {side: torch_logits(model.eval(), side) for side in ("right", "left")}

  cfg, pretrained = hf.load_pretrained(directory)
  peft_cfg, adapter = peft_format.import_adapter(tmp_path / "saved", cfg, "sst")
  assert peft_cfg.lora_rank == 4 and peft_cfg.lora_scale == 2.0
  expected_modules = {
    "llama": {f"encoder/layer_{i}/attention/{p}" for i in (0, 1) for p in ("query", "value")}
    | {"encoder/layer_0/ffn/gate", "encoder/layer_1/ffn/gate"},
    "gpt2": {f"encoder/layer_{i}/{p}" for i in (0, 1) for p in ("attention/qkv", "ffn/output")},
  }[family]
  assert set(peft_lib.lora_modules(cfg, peft_cfg)) == expected_modules
  model_ours = make_task_model(cfg.replace(peft=peft_cfg), {"sst": head()})
  params, _ = graft.graft(init_params(model_ours, jax.random.key(0)), pretrained)
  params = peft_format.with_adapter(params, adapter)
  for side, theirs in expected.items():
    ours = our_logits(cfg, peft_cfg, params, side)
    print(f"{family} {side}: peft_format import max |diff| {np.max(np.abs(ours - theirs)):.2e}")
    np.testing.assert_allclose(ours, theirs, atol=TOL)


def test_peft_format_errors_name_the_problem(base, tmp_path):
  directory = base("llama")
  cfg, pretrained = hf.load_pretrained(directory)
  peft_cfg = peft_lib.PeftConfig("lora", lora_rank=2)
  params = our_params(cfg, peft_cfg, pretrained)
  biased = paths.map_with_path(lambda p, x: x + 1 if p.endswith("output/bias") else x, params)
  with pytest.raises(ValueError, match=r"heads/sst/output/bias is non-zero.*optim.freeze"):
    peft_format.export_adapter(tmp_path / "a", cfg, peft_cfg, biased, "sst")
  with pytest.raises(ValueError, match=r"no head 'nope'"):
    peft_format.export_adapter(tmp_path / "a", cfg, peft_cfg, params, "nope")
  out = peft_format.export_adapter(tmp_path / "a", cfg, peft_cfg, params, "sst")
  config = json.loads((out / peft_format.ADAPTER_CONFIG).read_text())
  assert config["target_modules"] == ["q_proj", "v_proj"]  # Every layer's: the short names.
  (out / peft_format.ADAPTER_CONFIG).write_text(json.dumps(dict(config, use_dora=True)))
  with pytest.raises(ValueError, match=r"\['use_dora'\] not supported"):
    peft_format.import_adapter(out, cfg, "sst")
  gpt2_cfg, _ = hf.load_pretrained(base("gpt2"))
  (out / peft_format.ADAPTER_CONFIG).write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' is not in"):
    peft_format.import_adapter(out, gpt2_cfg, "sst")


def test_peft_format_cli_exports_a_tiny_llama_run_that_peft_loads(minilm_dir, base, tmp_path):
  """configs/sst2_decoder.py on a tiny random Llama checkpoint, trained by the real trainer,
  then ``python -m research.transfer.peft_format export``: peft's model predicts what ours
  does with the run's params."""
  from hf_tiny import llama_checkpoint
  from train_util import load_config_module

  from research.train.trainer import train_and_evaluate

  checkpoint = llama_checkpoint(
    dict(CASES["llama"][3], vocab_size=30522), minilm_dir, tmp_path / "llama"
  )
  run = load_config_module("sst2_decoder").get_config(f"tiny,checkpoint={checkpoint}")
  train_and_evaluate(run, str(tmp_path / "run"))
  assert peft_format.main(["export", str(tmp_path / "run"), str(tmp_path / "adapter")]) == 0
  config = json.loads((tmp_path / "adapter" / peft_format.ADAPTER_CONFIG).read_text())
  assert config["base_model_name_or_path"] == str(tmp_path / "llama") and config["r"] == 16

  cfg, _ = hf.load_pretrained(tmp_path / "llama")
  params = peft_format.run_params(tmp_path / "run")
  peft_cfg = peft_lib.from_config(run.model.peft)
  model = make_task_model(cfg.replace(peft=peft_cfg), {"sst2": head(2)})
  ids, mask = batch()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["sst2"])
  classifier = hf_classifier("llama", tmp_path / "llama", labels=2)
  loaded = peft.PeftModel.from_pretrained(classifier, str(tmp_path / "adapter")).eval()
  assert ours.shape == (3, 2)
  np.testing.assert_allclose(torch_logits(loaded, "right"), ours, atol=TOL)
  assert families.family_of(cfg).name == "llama"


def test_peft_format_bert_lora_and_classifier_load_in_peft_with_equal_logits(tmp_path):
  """The BERT-like family: base-model names under the classifier's ``bert.`` prefix, the fused
  q/k/v's query and value slices adapted, the pooler-fed ``classifier`` (with its bias) saved."""
  from hf_tiny import make_checkpoint

  directory = make_checkpoint("bert", tmp_path / "bert")
  cfg, pretrained = hf.load_pretrained(directory)
  peft_cfg = peft_lib.PeftConfig("lora", lora_rank=4, lora_alpha=8.0)  # Query and value.
  heads = {"sst": HeadConfig(num_labels=LABELS, pooling="pooler", dropout=0.0)}
  model = make_task_model(cfg.replace(peft=peft_cfg), heads)
  params, _ = graft.graft(init_params(model, jax.random.key(0)), pretrained)
  rng = np.random.default_rng(3)
  params = paths.map_with_path(
    lambda p, x: (
      jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
      if p.endswith(("lora_a", "lora_b")) or p.startswith("heads/")
      else x
    ),
    params,
  )
  out = peft_format.export_adapter(
    tmp_path / "adapter", cfg, peft_cfg, params, "sst", head_module="classifier", prefix="bert."
  )
  config = json.loads((out / peft_format.ADAPTER_CONFIG).read_text())
  assert config["target_modules"] == ["query", "value"]
  assert config["modules_to_save"] == ["classifier"]
  torch.manual_seed(5)
  classifier = transformers.BertForSequenceClassification.from_pretrained(
    str(directory), num_labels=LABELS
  ).eval()
  loaded = peft.PeftModel.from_pretrained(classifier, str(out)).eval()
  ids, mask = batch()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["sst"])
  theirs = torch_logits(loaded, "right")
  print(f"bert: peft_format export max |diff| {np.max(np.abs(ours - theirs)):.2e}")
  np.testing.assert_allclose(theirs, ours, atol=TOL)
  peft_back, adapter = peft_format.import_adapter(out, cfg, "sst", prefix="bert.")
  assert set(peft_lib.lora_modules(cfg, peft_back)) == set(peft_lib.lora_modules(cfg, peft_cfg))
  again = peft_format.with_adapter(params, adapter)
  for path, value in paths.flatten(params).items():
    np.testing.assert_allclose(paths.flatten(again)[path], value, atol=1e-7, err_msg=path)

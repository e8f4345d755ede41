"""Decoder-only families (GPT-2, Llama, Qwen2, Gemma) against transformers on tiny random models.

Each case builds a 2-layer checkpoint with transformers itself (its ``*ForCausalLM``), loads it
with research.transfer.hf and compares the last hidden states and the LM logits on a padded
batch, right- and left-padded, at the real tokens only (padding carries no meaning in either
implementation). Test ids carry the family's name, so ``pytest -k llama`` selects them.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import paths
from research.models import families
from research.models.decoder_only import core
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.transfer import graft, hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB = 99
PAD = 0
LLAMA = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=37,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  pad_token_id=PAD,
)
# name -> (transformers config class, causal-LM class, config kwargs)
CASES = {
  "gpt2": (
    "GPT2Config",
    "GPT2LMHeadModel",
    dict(
      vocab_size=VOCAB,
      n_embd=32,
      n_layer=2,
      n_head=4,
      n_positions=64,
      pad_token_id=PAD,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
  "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
  "llama3_rope": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      LLAMA,
      max_position_embeddings=512,
      # head_dim 8: wavelengths 6.3 (kept), 63 (smoothed: between 256/8 and 256/1), 628 and
      # 6283 (divided by the factor), so every branch of the Llama-3 rule is exercised.
      rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=8.0,
        original_max_position_embeddings=256,
      ),
    ),
  ),
  "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA, tie_word_embeddings=True)),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA, bos_token_id=1, eos_token_id=2)),
  # head_dim 16 with width 32 and 4 heads: Gemma's head size is independent of the width.
  "gemma": (
    "GemmaConfig",
    "GemmaForCausalLM",
    dict(LLAMA, head_dim=16, bos_token_id=1, eos_token_id=2),
  ),
}

FAMILY_OF_CASE = {name: CASES[name][0].removesuffix("Config").lower() for name in CASES}


def make_causal_lm(name: str, seed: int = 0):
  """The random transformers model of case ``name`` (eval mode, fp32)."""
  config_cls, model_cls, kwargs = CASES[name]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**kwargs)
  # Eager attention: the reference is the plain math every time, not whichever fused SDPA
  # kernel torch picks at run time.
  config._attn_implementation = "eager"
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # Biases and norm weights start at 0 or 1: move them so they count.
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """``name -> (directory, torch model)``, made once per module on first use."""
  made: dict[str, tuple[Path, object]] = {}

  def get(name: str) -> tuple[Path, object]:
    if name not in made:
      model = make_causal_lm(name)
      directory = tmp_path_factory.mktemp(name)
      model.save_pretrained(directory)
      made[name] = (directory, model)
    return made[name]

  return get


def padded_batch(side: str, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
  """Three rows of lengths 10, 4 and 7, padded to 10 on ``side``."""
  rng = np.random.default_rng(0)
  ids = np.full((3, 10), pad, np.int32)
  mask = np.zeros((3, 10), np.int32)
  for i, n in enumerate([10, 4, 7]):
    cols = slice(0, n) if side == "right" else slice(10 - n, 10)
    ids[i, cols] = rng.integers(3, VOCAB, n)
    mask[i, cols] = 1
  return ids, mask


def ours(cfg, params, ids, mask, **kw):
  module = families.family_of(cfg).encoder(cfg)
  out = module.apply(
    {"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask), return_logits=True, **kw
  )
  return np.asarray(out["hidden_states"]), np.asarray(out["logits"])


def theirs(model, ids, mask, **kw):
  args = dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  args.update({k: torch.from_numpy(np.array(v)).long() for k, v in kw.items()})
  with torch.no_grad():
    hidden = model.base_model(**args).last_hidden_state.numpy()
    logits = model(**args).logits.numpy()
  return hidden, logits


def max_diffs(a, b, mask) -> tuple[float, float]:
  real = mask.astype(bool)
  return tuple(float(np.max(np.abs(x[real] - y[real]))) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(CASES))
def test_causal_lm_parity_with_transformers(checkpoints, name, side):
  directory, model = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  assert families.family_of(cfg).name == FAMILY_OF_CASE[name]
  ids, mask = padded_batch(side, cfg.pad_token_id)
  hidden, logits = max_diffs(ours(cfg, params, ids, mask), theirs(model, ids, mask), mask)
  print(f"{name} {side}: hidden {hidden:.2e} logits {logits:.2e}")
  assert hidden <= TOL and logits <= TOL


@pytest.mark.parametrize("name", ["llama", "llama3_rope"])
def test_llama_positions_from_mask_match_generate_and_both_sides(checkpoints, name):
  """Positions counted over real tokens (generate's) make left padding equal right padding."""
  directory, model = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  cfg = cfg.replace(position_ids_from_mask=True)
  got = {}
  for side in ("right", "left"):
    ids, mask = padded_batch(side, cfg.pad_token_id)
    pos = np.asarray(core.position_ids(jnp.asarray(mask), True))
    mine = ours(cfg, params, ids, mask)
    hidden, logits = max_diffs(mine, theirs(model, ids, mask, position_ids=pos), mask)
    assert hidden <= TOL and logits <= TOL, side
    got[side] = mine[0][mask.astype(bool)]
  np.testing.assert_allclose(got["left"], got["right"], atol=TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_causal_lm_export_loads_in_transformers_cleanly(checkpoints, tmp_path, name):
  directory, model = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  hf.save_pretrained(tmp_path, cfg, params)
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), output_loading_info=True
  )
  assert type(loaded) is type(model)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, mask = padded_batch("right", cfg.pad_token_id)
  hidden, logits = max_diffs(theirs(loaded.eval(), ids, mask), theirs(model, ids, mask), mask)
  assert hidden <= TOL and logits <= TOL


def test_llama_base_model_and_sharded_checkpoints_load(checkpoints, tmp_path):
  """A base ``LlamaModel`` export (no ``model.`` prefix, no LM head) and a sharded index."""
  directory, model = checkpoints("llama")
  model.model.save_pretrained(tmp_path / "base")
  cfg, params = hf.load_pretrained(tmp_path / "base")
  assert not cfg.lm_head and "lm_head" not in params["encoder"]
  ids, mask = padded_batch("right")
  module = families.family_of(cfg).encoder(cfg)
  hidden = module.apply({"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask))
  real = mask.astype(bool)
  expected = theirs(model, ids, mask)[0]
  np.testing.assert_allclose(np.asarray(hidden["hidden_states"])[real], expected[real], atol=TOL)

  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX).is_file()
  sharded_cfg, sharded = hf.load_pretrained(tmp_path / "sharded")
  _, single = hf.load_pretrained(directory)
  assert sharded_cfg.lm_head
  for path, value in paths.flatten(single).items():
    np.testing.assert_array_equal(paths.flatten(sharded)[path], value, err_msg=path)


SEQUENCE_CLASSIFIERS = {
  "gpt2": ("GPT2ForSequenceClassification", "transformer"),
  "llama": ("LlamaForSequenceClassification", "model"),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(SEQUENCE_CLASSIFIERS))
def test_last_token_pooling_equals_transformers_sequence_classification(checkpoints, name, side):
  """Our TaskModel (family encoder + 'last'-pooled linear head) against the HF classifier with
  the same base weights and our head's kernel as its ``score`` layer."""
  directory, causal = checkpoints(name)
  cls_name, base = SEQUENCE_CLASSIFIERS[name]
  torch.manual_seed(1)
  settings = {k: v for k, v in causal.config.to_dict().items() if k not in ("id2label", "label2id")}
  classifier = getattr(transformers, cls_name)(type(causal.config)(**settings, num_labels=3))
  classifier.eval()
  getattr(classifier, base).load_state_dict(getattr(causal, base).state_dict())
  cfg, params = hf.load_pretrained(directory)
  model = make_task_model(cfg, {"sst": HeadConfig(num_labels=3, pooling="last", dropout=0.0)})
  full = init_params(model, jax.random.key(0))
  full["encoder"] = params["encoder"]
  score = classifier.score.weight.detach().numpy()
  full["heads"]["sst"]["output"] = {"kernel": score.T, "bias": np.zeros(3, np.float32)}
  ids, mask = padded_batch(side, cfg.pad_token_id)
  got = model.apply({"params": full}, jnp.asarray(ids), jnp.asarray(mask))["sst"]
  with torch.no_grad():
    expected = classifier(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).logits.numpy()
  np.testing.assert_allclose(np.asarray(got), expected, atol=TOL)


def test_llama_lm_head_kept_by_default_and_dropped_by_a_graft_rule(checkpoints):
  directory, _ = checkpoints("llama")
  cfg, params = hf.load_pretrained(directory)
  model = make_task_model(cfg, {"sst": HeadConfig(num_labels=2, pooling="last")})
  target = init_params(model, jax.random.key(0))
  rules = families.family_of(cfg).graft_rules
  kept, report = graft.graft(target, params, rules)
  assert ("encoder/lm_head/kernel", "encoder/lm_head/kernel") in report.transferred
  np.testing.assert_array_equal(
    kept["encoder"]["lm_head"]["kernel"], params["encoder"]["lm_head"]["kernel"]
  )
  drop = (("encoder/lm_head/.*", None), *rules)
  dropped, report = graft.graft(target, params, drop)
  assert "encoder/lm_head/kernel" in report.left_at_init
  assert "encoder/lm_head/kernel" in report.unused_in_source
  assert "encoder/lm_head/kernel" in report.table()
  np.testing.assert_array_equal(
    dropped["encoder"]["lm_head"]["kernel"], target["encoder"]["lm_head"]["kernel"]
  )


DECODING = ["gpt2", "llama", "qwen2", "gemma"]


@pytest.mark.parametrize("name", DECODING)
def test_kv_cache_decoding_equals_full_forward(checkpoints, name):
  """Prefill 6 columns of a left-padded batch, then one token at a time: the logits equal the
  full forward's at every real position (positions counted over real tokens in both)."""
  directory, _ = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  cfg = cfg.replace(position_ids_from_mask=True)
  module = families.family_of(cfg).encoder(cfg)
  variables = {"params": params["encoder"]}
  ids, mask = (jnp.asarray(a) for a in padded_batch("left", cfg.pad_token_id))
  full = module.apply(variables, ids, mask, return_logits=True)["logits"]
  cache = core.init_cache(cfg, ids.shape[0], ids.shape[1])
  steps = [(0, 6), *((i, i + 1) for i in range(6, ids.shape[1]))]
  pieces = []
  for start, stop in steps:
    out = module.apply(variables, ids[:, start:stop], mask, return_logits=True, cache=cache)
    cache = out["cache"]
    pieces.append(out["logits"])
  incremental = jnp.concatenate(pieces, axis=1)
  with pytest.raises(ValueError, match="needs an attention_mask of 10 columns"):
    module.apply(variables, ids[:, :1], mask[:, :1], cache=core.init_cache(cfg, 3, 10))
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], atol=TOL)


@pytest.mark.parametrize("name", DECODING)
def test_greedy_generate_equals_transformers_generate(checkpoints, name):
  directory, model = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  module = families.family_of(cfg).encoder(cfg)
  ids, mask = padded_batch("left", cfg.pad_token_id)
  ids, mask = ids[:, :8], mask[:, :8]  # Left-padded prompts of lengths 8, 2 and 5.
  new, eos = 6, model.config.eos_token_id
  generate = jax.jit(
    functools.partial(
      core.greedy_generate,
      module,
      max_new_tokens=new,
      eos_token_id=eos,
      pad_token_id=cfg.pad_token_id,
    )
  )
  got = np.asarray(generate(params["encoder"], jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    expected = model.generate(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      max_new_tokens=new,
      do_sample=False,
      pad_token_id=cfg.pad_token_id,
      eos_token_id=eos,
    ).numpy()[:, ids.shape[1] :]
  n = expected.shape[1]  # Shorter when every row stopped at eos.
  np.testing.assert_array_equal(got[:, :n], expected)
  assert (got[:, n:] == cfg.pad_token_id).all()


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma"])
def test_decoder_family_tiny_has_the_encoder_interface_and_remat_matches(family):
  record = families.family_named(family)
  cfg = record.tiny()
  assert families.family_of(cfg) is record and families.family_for(family) is record
  ids = jnp.asarray([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32)
  plain = record.encoder(cfg)
  variables = plain.init(jax.random.key(0), ids, mask)
  names = record.weight_names(cfg)
  assert set(paths.flatten({"encoder": variables["params"]})) == set(names)
  out = plain.apply(variables, ids, mask, None, deterministic=True, first_token_only=True)
  assert out["hidden_states"].shape == (2, 5, cfg.hidden_size) and out["pooled"] is None
  again = record.encoder(cfg, remat=True).apply(variables, ids, mask)
  np.testing.assert_allclose(again["hidden_states"], out["hidden_states"], atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "gemma"])
def test_decoder_checkpoint_verifies_with_the_hf_cli(checkpoints, name, capsys):
  directory, _ = checkpoints(name)
  assert hf.main(["verify", str(directory)]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("max_abs_diff=") and float(line.split("=")[1]) <= TOL


def test_decoder_configs_refuse_what_is_not_implemented():
  llama = families.family_for("llama")
  scaled = dict(
    model_type="llama",
    vocab_size=9,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=8,
    rope_scaling={"rope_type": "yarn", "factor": 2.0},
  )
  with pytest.raises(ValueError, match=r"c\.json: rope type 'yarn' is not implemented"):
    llama.from_hf(scaled, "c.json")
  sliding = dict(scaled, model_type="qwen2", rope_scaling=None, use_sliding_window=True)
  with pytest.raises(ValueError, match="sliding-window attention is not implemented"):
    families.family_for("qwen2").from_hf(sliding, "c.json")
  with pytest.raises(ValueError, match="missing key 'hidden_size'"):
    llama.from_hf({k: v for k, v in scaled.items() if k != "hidden_size"}, "c.json")


def test_llama_checkpoint_fine_tunes_sst2_end_to_end_with_last_token_pooling(minilm_dir, tmp_path):
  """The real trainer on a tiny random Llama (MiniLM's tokenizer and vocabulary, pad id 0),
  the classification head on the last real token; the untied LM head is grafted too."""
  from hf_tiny import llama_checkpoint
  from train_util import load_config_module

  from research.train.state import build_model
  from research.train.trainer import train_and_evaluate

  sizes = dict(LLAMA, vocab_size=30522, intermediate_size=64, tie_word_embeddings=False)
  checkpoint = llama_checkpoint(sizes, minilm_dir, tmp_path / "llama")
  run = load_config_module("sst2_minilm").get_config("tiny")
  run.model.update(checkpoint=str(checkpoint), init="pretrained")
  run.tasks.sst2.head.pooling = "last"
  _, enc = build_model(run, {"sst2": 2})
  assert families.family_of(enc).name == "llama"
  results = train_and_evaluate(run, str(tmp_path / "run"))
  assert results["steps"] == run.train.steps
  assert 0.0 <= results["eval"]["sst2"]["accuracy"] <= 1.0
  report = (tmp_path / "run" / "graft_report.txt").read_text()
  n = len(families.family_of(enc).weight_names(enc))
  assert f"graft: {n} transferred, 2 left at init, 0 unused in source" in report
  assert "encoder/lm_head/kernel" in report


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_token_head_is_causal(family):
  """A per-token head on a decoder: a later token never changes an earlier position's logits."""
  cfg = families.family_named(family).tiny()
  model = make_task_model(cfg, {"ner": HeadConfig(layout="token", num_labels=5, dropout=0.0)})
  params = init_params(model, jax.random.key(0))
  ids = jnp.asarray([[5, 6, 7, 8, 9]], jnp.int32)
  changed = ids.at[0, 3].set(40)
  a = model.apply({"params": params}, ids, jnp.ones_like(ids))["ner"]
  b = model.apply({"params": params}, changed, jnp.ones_like(ids))["ner"]
  assert a.shape == (1, 5, 5)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, 3:] - b[:, 3:]))) > 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_decoder_bf16_compute_stays_close_to_fp32(checkpoints, name):
  directory, _ = checkpoints(name)
  cfg, params = hf.load_pretrained(directory)
  record = families.family_of(cfg)
  ids, mask = (jnp.asarray(a) for a in padded_batch("left", cfg.pad_token_id))
  variables = {"params": params["encoder"]}
  full = record.encoder(cfg).apply(variables, ids, mask, return_logits=True)["logits"]
  half = record.encoder(cfg, dtype=jnp.bfloat16).apply(variables, ids, mask, return_logits=True)
  assert half["hidden_states"].dtype == jnp.bfloat16 and half["logits"].dtype == jnp.float32
  real = np.asarray(mask).astype(bool)
  diff = np.abs(np.asarray(half["logits"])[real] - np.asarray(full)[real])
  assert np.isfinite(diff).all() and diff.max() < 0.1, diff.max()


def test_llama_sst2_decoder_tiny_config_trains_lora_and_head_only(minilm_dir, tmp_path):
  """configs/sst2_decoder.py:tiny, a random Llama made in-process on MiniLM's tokenizer: the
  real trainer with LoRA r=16 on q/v and the last-token head; only they are trainable."""
  from train_util import load_config_module

  from research.train.state import encoder_config
  from research.train.trainer import train_and_evaluate
  from research.transfer import peft

  run = load_config_module("sst2_decoder").get_config("tiny")
  enc = encoder_config(run.model)
  assert families.family_of(enc).name == "llama" and enc.vocab_size == 30522
  assert enc.peft.lora_rank == 16 and enc.num_kv_heads == 2
  results = train_and_evaluate(run, str(tmp_path))
  assert results["steps"] == run.train.steps and "accuracy" in results["eval"]["sst2"]
  head = 32 * 2  # The kernel; the bias stays 0 (transformers' `score` has none).
  expected = peft.analytic_trainable_count(enc, enc.peft, head)
  assert expected == 2 * (16 * (32 + 32) + 16 * (32 + 16)) + head  # q [32,32], v [32,16].
  assert results["params"]["trainable"] == expected


def test_llama_sst2_decoder_checkpoint_variant_keeps_the_base_bitwise(minilm_dir, tmp_path):
  """``tiny,checkpoint=DIR`` on a tiny random transformers Llama: every base weight grafted,
  LoRA and the head left at init, and after training the base is bitwise the checkpoint's."""
  from hf_tiny import llama_checkpoint
  from train_util import load_config_module

  from research.train import checkpoints
  from research.train.trainer import train_and_evaluate

  # Intermediate 37, not the tiny variant's 64: the checkpoint's sizes must win.
  checkpoint = llama_checkpoint(dict(LLAMA, vocab_size=30522), minilm_dir, tmp_path / "llama")
  run = load_config_module("sst2_decoder").get_config(f"tiny,checkpoint={checkpoint}")
  train_and_evaluate(run, str(tmp_path / "run"))
  cfg, source = hf.load_pretrained(tmp_path / "llama")
  n = len(families.family_of(cfg).weight_names(cfg))
  report = (tmp_path / "run" / "graft_report.txt").read_text()
  assert f"graft: {n} transferred, {2 * 2 * 2 + 2} left at init, 0 unused in source" in report
  trained, _ = checkpoints.load_params(tmp_path / "run", prefer="latest")
  flat = paths.flatten(trained)
  for path, value in paths.flatten(source).items():
    np.testing.assert_array_equal(flat[path], value, err_msg=path)
  assert np.any(flat["encoder/layer_0/attention/query/lora_b"] != 0)

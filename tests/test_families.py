"""Model families as plug-ins: the registry, MPNet and the CNN trained end to end through it.

The end-to-end tests run the real trainer (research.train.loop.train_and_evaluate) on the
committed SST-2 fixture: a tiny random MPNet checkpoint fine-tuned as configs/sst2_minilm.py:tiny
pointed at it, and configs/sst2_cnn.py:tiny,static, whose embedding table must arrive from
MiniLM bitwise (frozen, so it is still MiniLM's after training).
"""

import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_util import load_config_module

from research import paths
from research.models import bert, cnn, families, mpnet
from research.models.config import EncoderConfig
from research.models.family import Family
from research.train import checkpoints as ckpt_lib
from research.train import parallel
from research.train.state import build_model, init_fn, init_plan
from research.train.trainer import train_and_evaluate  # Registers the programs.
from research.transfer import hf

REPO = Path(__file__).resolve().parents[1]
FAMILY_MODULES = {"bert.py", "mpnet.py", "cnn.py", "families.py", "family.py"}
# research/models/<package>/: every module is a family's.
FAMILY_PACKAGES = {"decoder_only", "encoder_decoder"}


def test_registry_finds_families_by_model_type_name_and_config():
  for model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "electra"):
    assert families.family_for(model_type) is bert.FAMILY
  assert families.family_for("mpnet") is mpnet.FAMILY
  assert families.family_named("cnn") is cnn.FAMILY
  assert families.family_of(EncoderConfig.tiny()) is bert.FAMILY
  assert families.family_of(mpnet.MPNetConfig.tiny()) is mpnet.FAMILY
  assert families.family_of(cnn.CnnConfig.tiny()) is cnn.FAMILY
  assert not cnn.FAMILY.has_hf_weights and "cnn" not in families.model_types()
  with pytest.raises(ValueError, match=r"x\.json: unknown model_type 'xlnet'"):
    families.family_for("xlnet", "x.json")
  registered = "'bert', 'mpnet', 'cnn', 'gpt2', 'llama', 'qwen2', 'gemma', 't5'"
  with pytest.raises(ValueError, match=re.escape(f"registered: [{registered}")):
    families.family_named("lstm")
  with pytest.raises(ValueError, match="already registered: name 'mpnet', model_type 'mpnet'"):
    families.register_family(Family("mpnet", dict, mpnet.MPNetEncoder, model_types=("mpnet",)))


def test_nothing_outside_the_family_modules_branches_on_a_family_name():
  """The seam holds: no ``model_type ==`` or family-name literal outside the family modules."""
  branch = re.compile(r"\b(family|model_type)\w*\s*(==|!=)|\b(family|model_type) in [(\[{]")
  literal = re.compile(
    r"[\"'](bert|roberta|xlm-roberta|camembert|distilbert|electra|mpnet|cnn|gpt2|llama|qwen2|gemma|t5|mt5|umt5)"
    r"[\"']"
  )
  hits = []
  for file in sorted((REPO / "research").rglob("*.py")):
    if file.parent.name == "models" and file.name in FAMILY_MODULES:
      continue
    if file.parent.parent.name == "models" and file.parent.name in FAMILY_PACKAGES:
      continue
    for n, line in enumerate(file.read_text().splitlines(), 1):
      if branch.search(line) or (literal.search(line) and "model_type: str =" not in line):
        hits.append(f"{file.relative_to(REPO)}:{n}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_every_family_encoder_has_the_encoder_interface():
  ids = jnp.asarray([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32)
  for family in (bert.FAMILY, mpnet.FAMILY, cnn.FAMILY):
    module = family.encoder(family.tiny(), dtype=jnp.float32, param_dtype=jnp.float32)
    variables = module.init(jax.random.key(0), ids, mask)
    out = module.apply(variables, ids, mask, None, deterministic=True)
    assert out["hidden_states"].shape[:2] == (2, 5), family.name
    assert out["pooled"].shape[0] == 2, family.name


def test_cnn_features_ignore_padding():
  cfg = cnn.CnnConfig.tiny()
  module = cnn.CnnEncoder(cfg)
  short = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
  padded = jnp.pad(short, ((0, 0), (0, 6)))
  variables = module.init(jax.random.key(0), padded)
  a = module.apply(variables, short, jnp.ones_like(short))["pooled"]
  b = module.apply(variables, padded, (padded != 0).astype(jnp.int32))["pooled"]
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert float(jnp.max(a)) > 0
  assert variables["params"]["conv_3"]["kernel"].shape == (3, cfg.embedding_dim, cfg.filters)


def test_family_sharding_rules_apply_when_the_run_names_none():
  mesh = parallel.make_mesh(parallel.ml_collections.ConfigDict(dict(fsdp=2, mode="jit")))
  params = {"encoder": {"conv_3": {"kernel": jnp.zeros((3, 16, 4)), "bias": jnp.zeros(4)}}}
  cfg = parallel.ml_collections.ConfigDict(dict(fsdp=2, mode="jit", fsdp_rules=()))
  none = parallel.state_shardings(params, mesh, cfg)
  assert none["encoder"]["conv_3"]["kernel"].is_fully_replicated
  rules = cnn.FAMILY.sharding_rules
  sharded = parallel.state_shardings(params, mesh, cfg, default_rules=rules)
  assert not sharded["encoder"]["conv_3"]["kernel"].is_fully_replicated
  assert sharded["encoder"]["conv_3"]["bias"].is_fully_replicated


def make_tiny_mpnet_with_minilm_tokenizer(directory: Path, minilm_dir: Path) -> Path:
  """A random 2-layer MPNet over MiniLM's vocabulary, with MiniLM's tokenizer files."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.MPNetConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
  )
  torch.manual_seed(0)
  transformers.MPNetModel(config).eval().save_pretrained(directory, safe_serialization=True)
  for name in hf.TOKENIZER_FILES:
    if (minilm_dir / name).is_file():
      shutil.copy2(minilm_dir / name, directory / name)
  return directory


def test_mpnet_checkpoint_fine_tunes_end_to_end(minilm_dir, tmp_path):
  checkpoint = make_tiny_mpnet_with_minilm_tokenizer(tmp_path / "mpnet", minilm_dir)
  config = load_config_module("sst2_minilm").get_config("tiny")
  config.model.update(checkpoint=str(checkpoint), init="pretrained")
  model, enc = build_model(config, {"sst2": 2})
  assert isinstance(enc, mpnet.MPNetConfig) and isinstance(
    model.encoder_module(), mpnet.MPNetEncoder
  )
  results = train_and_evaluate(config, str(tmp_path / "run"))
  assert results["steps"] == config.train.steps
  assert 0.0 <= results["eval"]["sst2"]["accuracy"] <= 1.0
  n = len(mpnet.leaf_map(enc))
  report = (tmp_path / "run" / "graft_report.txt").read_text()
  assert f"graft: {n} transferred, 2 left at init, 0 unused in source" in report
  assert "encoder/relative_attention_bias/embedding" in report


def test_cnn_init_plan_uses_the_family_graft_rule():
  config = load_config_module("sst2_cnn").get_config("tiny")
  assert init_plan(config) == ("pretrained", [tuple(r) for r in cnn.GRAFT_RULES])
  scratch = load_config_module("sst2_cnn").get_config("tiny,init=scratch")
  assert init_plan(scratch)[0] == "scratch"


def test_cnn_tiny_static_trains_with_minilm_word_vectors_bitwise(minilm_dir, tmp_path):
  config = load_config_module("sst2_cnn").get_config("tiny,static")
  model, enc = build_model(config, {"sst2": 2})
  assert isinstance(enc, cnn.CnnConfig) and (enc.vocab_size, enc.embedding_dim) == (30522, 384)
  results = train_and_evaluate(config, str(tmp_path))
  assert results["steps"] == config.train.steps
  report = (tmp_path / "graft_report.txt").read_text()
  assert re.search(
    r"transferred\s+encoder/word_embeddings/embedding\s+encoder/embeddings/word_embeddings/"
    r"embedding",
    report,
  )
  assert "graft: 1 transferred" in report
  final, _ = ckpt_lib.load_params(tmp_path, prefer="latest")
  _, minilm = hf.load_pretrained(minilm_dir)
  np.testing.assert_array_equal(
    final["encoder"]["word_embeddings"]["embedding"],
    minilm["encoder"]["embeddings"]["word_embeddings"]["embedding"],
  )
  initial = init_fn(model)(jax.random.key_data(jax.random.key(config.seed)))
  moved = (
    paths.flatten(final)["encoder/conv_2/kernel"] - paths.flatten(initial)["encoder/conv_2/kernel"]
  )
  assert float(np.max(np.abs(moved))) > 1e-4  # The convolutions did train.

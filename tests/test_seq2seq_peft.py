"""Parameter-efficient fine-tuning of the pretrained encoder-decoder families (T5, BART, Marian).

LoRA on T5 runs through the real trainer on a checkpoint made by transformers: the frozen base
comes out bitwise unchanged, only the LoRA matrices have optimizer state, and they move. BART
and Marian get LoRA in both stacks, and with ``lora_b`` at zero their logits are the base
model's exactly. BitFit is refused where a family cannot have it (T5: no biases); adapters
are tests/test_seq2seq_adapters.py's.
(``pytest tests/test_seq2seq_peft.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config_lib, paths
from research.models import families, seq2seq
from research.models.config import PeftConfig
from research.transfer import hf
from research.transfer import peft as peft_lib

REPO = Path(__file__).resolve().parents[1]
# Every attention projection of both stacks: self-attention, and the decoder's cross-attention.
ATTENTION = r"(encoder|decoder)/layer_\d+/(attention|cross_attention)/(query|key|value|output)"
T5_SIZES = dict(
  d_model=32,
  d_kv=8,
  d_ff=37,
  num_layers=2,
  num_heads=4,
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
  relative_attention_num_buckets=16,
  dropout_rate=0.0,
)


def t5_checkpoint(tokenizer_dir: Path, directory: Path) -> Path:
  """A random transformers T5 v1.1 on MiniLM's tokenizer (vocabulary, pad id), with its files."""
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.T5Config(
    vocab_size=30522, pad_token_id=0, decoder_start_token_id=0, eos_token_id=102, **T5_SIZES
  )
  transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(directory)
  for name in hf.TOKENIZER_FILES:
    if (tokenizer_dir / name).is_file():
      (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
  return directory


def _saved_state(run: Path) -> dict[str, np.ndarray]:
  """The latest saved train state of ``run``, flattened (``params/...``, ``opt_state/...``)."""
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(
    run / "checkpoints",
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": ocp.StandardCheckpointHandler()},
  )
  step = manager.latest_step()
  meta = manager.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
  )["state"]
  return {p: np.asarray(v) for p, v in paths.flatten(restored).items()}


def test_lora_t5_trains_only_lora_on_encoder_and_decoder_attention(tmp_path, minilm_dir):
  from research.train.trainer import train_and_evaluate

  source = t5_checkpoint(minilm_dir, tmp_path / "ckpt")
  module = config_lib.load_module(REPO / "configs/multi30k_t5.py")
  config = module.get_config(f"tiny,checkpoint={source}")
  config.model.peft.method = "lora"
  config.model.peft.lora_targets = (ATTENTION,)
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))

  _, base = hf.load_pretrained(source)
  base = paths.flatten(base)
  state = _saved_state(run)
  params = {p.removeprefix("params/"): v for p, v in state.items() if p.startswith("params/")}
  lora = sorted(p for p in params if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b"))
  # 2 encoder layers x 4 self-attention projections + 2 decoder layers x 8, each an A and a B.
  assert len(lora) == 2 * (2 * 4 + 2 * 8)
  assert {p.split("/", 1)[0] for p in lora} == {"encoder", "decoder"}
  assert any("/cross_attention/" in p for p in lora)
  # The frozen base: every checkpoint leaf, bitwise as loaded.
  assert set(params) == set(base) | set(lora)
  changed = [p for p in base if not np.array_equal(params[p], np.asarray(base[p]))]
  assert changed == []
  # Only the LoRA matrices have optimizer state (Adam's mu and nu: two per LoRA leaf).
  opt = [p for p, v in state.items() if p.startswith("opt_state/") and np.ndim(v) > 0]
  owners = {re.search(r"/((encoder|decoder|lm_head)/.*)", p).group(1) for p in opt}
  assert owners == set(lora)
  assert len(opt) == 2 * len(lora)
  # And the LoRA matrices moved: every B left zero (its init), every A its init draw.
  assert all(np.abs(params[p]).max() > 0 for p in lora if p.endswith("lora_b"))
  report = (run / "graft_report.txt").read_text()
  assert f"{len(base)} transferred, {len(lora)} left at init, 0 unused in source" in report


def _with_lora(family: str, targets: tuple[str, ...]):
  """A tiny ``family`` model with LoRA on ``targets`` and the same model without, sharing the
  base parameters; B is randomised after the check at zero."""
  base_cfg = families.family_named(family).tiny(hidden_dropout=0.0)
  peft = PeftConfig(method="lora", lora_targets=targets, lora_rank=2)
  plain = seq2seq.make_model(base_cfg, ("t",))
  lora = seq2seq.make_model(base_cfg.replace(peft=peft), ("t",))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 99, (2, 7)), jnp.int32)
  dec = jnp.asarray(np.random.default_rng(1).integers(3, 99, (2, 5)), jnp.int32)
  params = plain.init(jax.random.key(0), ids)["params"]
  lora_params = paths.flatten(lora.init(jax.random.key(1), ids)["params"])
  merged = {**lora_params, **paths.flatten(params)}
  apply = lambda m, p: m.apply({"params": p}, ids, decoder_input_ids=dec)["t"]
  return plain, lora, params, paths.unflatten(merged), apply


@pytest.mark.parametrize("family", ["bart", "marian"])
def test_lora_bart_marian_encoder_and_decoder_with_zero_b_is_the_base_model(family):
  targets = (ATTENTION, r"(encoder|decoder)/layer_\d+/ffn/(intermediate|output)")
  plain, lora, params, merged, apply = _with_lora(family, targets)
  modules = {p.rsplit("/", 1)[0] for p in paths.flatten(merged) if p.endswith("/lora_a")}
  cfg = families.family_named(family).tiny()
  assert modules == set(peft_lib.lora_modules(cfg, PeftConfig("lora", lora_targets=targets)))
  # 2 encoder layers x (4 + 2) projections, 2 decoder layers x (8 + 2).
  assert len(modules) == 2 * 6 + 2 * 10
  assert any(m.startswith("decoder/") and "/cross_attention/" in m for m in modules)
  assert any(m.startswith("encoder/") for m in modules)
  np.testing.assert_array_equal(np.asarray(apply(lora, merged)), np.asarray(apply(plain, params)))
  # A non-zero B changes the logits: the LoRA branch is on the path.
  flat = paths.flatten(merged)
  flat = {p: (v + 0.1 if p.endswith("lora_b") else v) for p, v in flat.items()}
  moved = apply(lora, paths.unflatten(flat))
  assert not np.allclose(np.asarray(moved), np.asarray(apply(plain, params)))


@pytest.mark.parametrize(
  "family, method, message",
  [
    ("t5", "bitfit", "the t5 family has no biases"),
  ],
)
def test_lora_t5_bart_refuse_peft_methods_they_cannot_have(family, method, message):
  with pytest.raises(ValueError, match=message):
    families.family_named(family).tiny(peft=PeftConfig(method=method))


def test_bitfit_bart_seq2seq_trains_every_bias_and_nothing_else(minilm_dir):
  from research import optim
  from research.train.setup import optim_config
  from research.train.state import encoder_config

  config = config_lib.load_module(REPO / "configs/multi30k_bart.py").get_config("tiny")
  config.model.peft.method = "bitfit"
  cfg = encoder_config(config.model)
  model = seq2seq.make_model(cfg, tuple(config.tasks))
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"]
  labels = paths.flatten(optim.freeze_labels(optim_config(config), shapes))
  trainable = {p for p, label in labels.items() if label == optim.TRAINABLE}
  assert trainable == {p for p in labels if p.endswith("bias")}
  assert "final_logits_bias" in trainable
  assert "decoder/layer_0/cross_attention/query/bias" in trainable

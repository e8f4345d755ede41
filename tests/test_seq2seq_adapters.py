"""Bottleneck adapters on the pretrained encoder-decoder families (T5, BART, mBART, Marian).

Both placements put adapters in every layer of both stacks (Houlsby: after self-attention,
the decoder's cross-attention and the FFN; Pfeiffer: after the FFN only), as many parameters
as the formula says; with ``up`` at zero the logits are the base model's exactly (post-LN
BART and Marian, pre-LN T5 and mBART alike). T5 adapters run through the real trainer on a
checkpoint made by transformers: the base comes out bitwise unchanged, only the adapters and
the norms have optimizer state, and the adapters move. (``pytest tests/test_seq2seq_adapters.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_seq2seq_peft import _saved_state, t5_checkpoint

from research import config_lib, paths
from research.models import families, seq2seq
from research.models.config import PeftConfig
from research.transfer import hf
from research.transfer import peft as peft_lib

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["t5", "bart", "mbart", "marian"]
ADAPTER = re.compile(r"(.*_adapter)/(down|up)/(kernel|bias)")


def _with_adapters(family: str, placement: str):
  """A tiny ``family`` model with adapters and the same model without, sharing the base
  parameters: ``(plain, adapted, base params, merged params, apply)``."""
  base_cfg = families.family_named(family).tiny(hidden_dropout=0.0)
  peft = PeftConfig(method="adapters", adapter_size=5, adapter_placement=placement)
  plain = seq2seq.make_model(base_cfg, ("t",))
  adapted = seq2seq.make_model(base_cfg.replace(peft=peft), ("t",))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 99, (2, 7)), jnp.int32)
  dec = jnp.asarray(np.random.default_rng(1).integers(3, 99, (2, 5)), jnp.int32)
  params = plain.init(jax.random.key(0), ids)["params"]
  adapter_params = paths.flatten(adapted.init(jax.random.key(1), ids)["params"])
  merged = {**adapter_params, **paths.flatten(params)}
  apply = lambda m, p: m.apply({"params": p}, ids, decoder_input_ids=dec)["t"]
  return plain, adapted, params, paths.unflatten(merged), apply


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_t5_bart_in_every_layer_of_both_stacks_counted(family, placement):
  _, _, params, merged, _ = _with_adapters(family, placement)
  flat = paths.flatten(merged)
  base = paths.flatten(params)
  adapters = {p: v for p, v in flat.items() if ADAPTER.fullmatch(p)}
  assert set(flat) == set(base) | set(adapters)  # Nothing else added, nothing renamed.
  modules = {ADAPTER.fullmatch(p).group(1) for p in adapters}
  per_layer = {"houlsby": ["attention_adapter", "ffn_adapter"], "pfeiffer": ["ffn_adapter"]}
  cross = ["cross_attention_adapter"] if placement == "houlsby" else []
  expected = {f"encoder/layer_{i}/{n}" for i in range(2) for n in per_layer[placement]}
  expected |= {f"decoder/layer_{i}/{n}" for i in range(2) for n in per_layer[placement] + cross}
  assert modules == expected
  h, m = 32, 5  # The tiny configs' width; the bottleneck above.
  count = sum(int(np.size(v)) for v in adapters.values())
  assert count == len(expected) * (2 * h * m + m + h)
  # The analytic count: the adapters plus every norm of both stacks.
  cfg = families.family_named(family).tiny()
  peft = PeftConfig(method="adapters", adapter_size=m, adapter_placement=placement)
  norms = sum(int(np.size(v)) for p, v in base.items() if re.fullmatch(peft_lib.SEQ2SEQ_NORMS, p))
  assert norms > 0
  assert peft_lib.analytic_trainable_count(cfg, peft, 7) == count + norms + 7


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_t5_bart_with_zero_up_are_the_base_model(family, placement):
  plain, adapted, params, merged, apply = _with_adapters(family, placement)
  np.testing.assert_array_equal(
    np.asarray(apply(adapted, merged)), np.asarray(apply(plain, params))
  )
  # A non-zero ``up`` changes the logits: the adapters are on the path. (Random, not +0.1
  # everywhere: that adds one value to every feature, which the LayerNorms after it undo.)
  flat = paths.flatten(merged)
  rng = np.random.default_rng(2)
  flat = {
    p: (v + 0.1 * rng.normal(size=v.shape) if re.fullmatch(r".*_adapter/up/kernel", p) else v)
    for p, v in flat.items()
  }
  moved = apply(adapted, paths.unflatten(flat))
  assert not np.allclose(np.asarray(moved), np.asarray(apply(plain, params)))


def test_adapters_t5_trains_only_adapters_and_norms(tmp_path, minilm_dir):
  from research.train.trainer import train_and_evaluate

  source = t5_checkpoint(minilm_dir, tmp_path / "ckpt")
  module = config_lib.load_module(REPO / "configs/multi30k_t5.py")
  config = module.get_config(f"tiny,checkpoint={source}")
  config.model.peft.method = "adapters"
  config.model.peft.adapter_size = 4
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))

  _, base = hf.load_pretrained(source)
  base = paths.flatten(base)
  state = _saved_state(run)
  params = {p.removeprefix("params/"): v for p, v in state.items() if p.startswith("params/")}
  adapters = sorted(p for p in params if ADAPTER.fullmatch(p))
  # Houlsby: 2 encoder layers x 2 adapters + 2 decoder layers x 3, each down/up kernel/bias.
  assert len(adapters) == 4 * (2 * 2 + 2 * 3)
  assert any("/cross_attention_adapter/" in p for p in adapters)
  assert set(params) == set(base) | set(adapters)
  norms = {p for p in base if re.fullmatch(peft_lib.SEQ2SEQ_NORMS, p)}
  # Per layer the attention and FFN norms (the decoder's cross-attention's too), a final norm
  # per stack: all trainable, as Houlsby et al. train every norm.
  assert len(norms) == 2 * 2 + 1 + 2 * 3 + 1
  # Everything else of the base, bitwise as loaded.
  changed = [p for p in base if p not in norms and not np.array_equal(params[p], base[p])]
  assert changed == []
  # Only the adapters and the norms have optimizer state (Adam's mu and nu: two per leaf).
  opt = [p for p, v in state.items() if p.startswith("opt_state/") and np.ndim(v) > 0]
  owners = {re.search(r"/((encoder|decoder|lm_head)/.*)", p).group(1) for p in opt}
  assert owners == set(adapters) | norms
  assert len(opt) == 2 * len(owners)
  # The adapters moved: every ``up`` kernel left zero (its init).
  assert all(np.abs(params[p]).max() > 0 for p in adapters if p.endswith("up/kernel"))
  report = (run / "graft_report.txt").read_text()
  assert f"{len(base)} transferred, {len(adapters)} left at init, 0 unused in source" in report

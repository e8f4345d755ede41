"""The task-kind seam: a kind written outside research/ trains, evaluates and predicts.

The test writes a module into tmp_path that registers a new kind, ``length_parity`` (is the
number of words in a text odd?), with its own data encoding (labels computed from the text,
the data set's own labels unused), head (one logit), loss (sigmoid cross-entropy), metrics and
predict-mode output. It then runs ``python -m research.main`` in train mode and in predict mode
with nothing in research/ knowing the kind: ``config.imports`` names the module, PYTHONPATH
finds it, and the run's config.json carries the name to predict mode.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from train_util import REPO

from research.subprocess_env import child_env

KIND_MODULE = '''
"""An outside task kind: parity of a text's word count, from one logit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import tasks
from research.data import tokenize
from research.models.heads import HeadConfig


@dataclasses.dataclass(frozen=True)
class ParityEncoder(tokenize.TextEncoder):
  """Reads only the text; the label is its word count mod 2 (the data set's label is unused)."""

  @property
  def encoding(self):
    return "parity-of-words"

  def columns(self, data_cfg):
    return [data_cfg.text_key]

  def label_names(self, data_cfg, features):
    return ["even", "odd"]

  def encode(self, data_cfg, tokenizer, columns, features):
    texts = columns[data_cfg.text_key]
    labels = [len(t.split()) % 2 for t in texts]
    return tokenize.texts(tokenizer, texts, data_cfg.max_length, labels=labels)


@tasks.register_kind("length_parity")
class LengthParity(tasks.TextKind):
  encoder = ParityEncoder()
  metric_names = ("parity_accuracy",)

  def head(self, task_cfg, num_labels):
    return HeadConfig(layout="scalar", num_labels=1, pooling="mean", dropout=0.0)

  def loss(self, outputs, batch, **options):
    weights = batch["example_mask"].astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(outputs, batch["labels"].astype(jnp.float32))
    return jnp.sum(bce * weights), jnp.sum(weights)

  def predict(self, outputs, batch=None):
    return {"p_odd": jax.nn.sigmoid(outputs)}

  def metrics(self, predictions, gold, label_names=None):
    keep = gold["example_mask"] > 0
    pred = predictions["p_odd"][keep] > 0.5
    return {
      "parity_accuracy": float(np.mean(pred == (gold["labels"][keep] == 1))),
      "examples": int(keep.sum()),
    }

  def render(self, out, row, batch, labels, inputs):
    p = float(out["p_odd"][row])
    return {"parity": labels[int(p > 0.5)], "p_odd": round(p, 6)}
'''

CONFIG = """
from research import config_lib

SST2 = config_lib.load_module({sst2!r})


def get_config(arg=None):
  c = SST2.get_config("tiny")
  c.experiment = "length_parity"
  c.imports = ("parity_kind",)
  c.tasks.sst2.kind = "length_parity"
  c.train.best_metric = "sst2/parity_accuracy"
  return c
"""


def _run(args, tmp_path):
  cmd = [sys.executable, "-m", "research.main", *args]
  env = child_env(tmp_path / "plugins", REPO)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_outside_task_kind_trains_evaluates_and_predicts(tmp_path, minilm_dir):
  plugins = tmp_path / "plugins"
  plugins.mkdir()
  (plugins / "parity_kind.py").write_text(textwrap.dedent(KIND_MODULE))
  config = tmp_path / "parity_config.py"
  config.write_text(CONFIG.format(sst2=str(REPO / "configs" / "sst2_minilm.py")))
  workdir = tmp_path / "run"

  _run([f"--config={config}", f"--workdir={workdir}"], tmp_path)
  results = json.loads((workdir / "results.json").read_text())
  scores = results["eval"]["sst2"]
  assert set(scores) >= {"parity_accuracy", "examples", "loss"}
  assert 0.0 <= scores["parity_accuracy"] <= 1.0 and scores["examples"] == 5
  assert json.loads((workdir / "config.json").read_text())["imports"] == ["parity_kind"]
  assert json.loads((workdir / "labels.json").read_text()) == {"sst2": ["even", "odd"]}

  lines = ["one two three", "", "a b"]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  out_file = tmp_path / "out.jsonl"
  _run(["--mode=predict", f"--workdir={workdir}", f"--input={tmp_path / 'in.txt'}",
        f"--output={out_file}"], tmp_path)  # fmt: skip
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert [r["line"] for r in records] == [1, 2, 3]
  assert records[1]["error"] == "empty line"
  for r in (records[0], records[2]):
    assert r["parity"] in ("even", "odd") and 0.0 <= r["p_odd"] <= 1.0


def test_unknown_kind_names_the_imports_field():
  from research import tasks

  with pytest.raises(ValueError, match=r"config\.imports"):
    tasks.get("no_such_kind")

"""Every experiment's ``smoke`` variant runs end to end on the real data and real MiniLM.

SST-2's smoke run goes through the command line in test_configs.py; the others are run here
in-process (the same ``train_and_evaluate`` the CLI calls), each checked for the results.json
metrics its task promises. Each takes well under a minute on 2 idle cores.
"""

import json
import subprocess
import sys

import pytest
from train_util import REPO, load_config_module

from research.subprocess_env import child_env

# (config, variant, data folder, {task: metrics results.json must hold}, steps)
NER = ("f1", "precision", "recall")
SLOW = pytest.mark.slow  # The same code path as a faster entry: kept out of the default suite.
SMOKES = [
  ("conll03_minilm", "smoke", "conll2003", {"conll03": NER}, 20),
  pytest.param(  # The conll03 code path on other data: kept out of the default suite's time.
    "conll02_es_minilm",
    "smoke",
    "conll2002_es",
    {"conll02_es": ("f1",)},
    20,
    marks=pytest.mark.slow,
  ),
  ("sst2_crossdomain", "smoke", "sentiment_labelled_sentences", {"sst2": ("accuracy", "f1")}, 0),
  ("multi30k_bert2rnd", "smoke", "multi30k", {"multi30k": ("bleu", "chrf", "bleu_signature")}, 10),
  ("multi30k_transformer", "smoke", "multi30k", {"multi30k": ("bleu", "chrf", "length_ratio")}, 10),
  # Pretrained encoder-decoders without their weights: random tiny models on the real data.
  ("multi30k_t5", "smoke", "multi30k", {"multi30k": ("bleu", "chrf")}, 10),
  *(
    pytest.param(name, "smoke", "multi30k", {"multi30k": ("bleu", "chrf")}, 10, marks=SLOW)
    for name in ("multi30k_bart", "multi30k_marian")
  ),
  ("stsb_minilm", "smoke", "stsb", {"stsb": ("pearson", "spearman")}, 20),
  ("mrpc_minilm", "smoke", "mrpc", {"mrpc": ("accuracy", "f1_paraphrase")}, 20),
  ("sst2_cnn", "smoke", "sst2", {"sst2": ("accuracy", "f1")}, 20),
  ("ablations/sst2_transfer", "smoke", "sst2", {"sst2": ("accuracy",)}, 10),
  ("intent_fewshot_maml", "smoke", "banking77", {"banking77": ("accuracy", "ci95")}, 2),
  (
    "multitask_sst2_conll",
    "smoke",
    "conll2003",
    {"conll03": ("f1",), "sst2": ("accuracy", "f1")},
    20,
  ),
]


def test_every_smoke_variant_is_run_here():
  """A new config's ``smoke`` variant joins this list (SST-2's runs through the command line
  in test_configs.py)."""
  covered = {(s.values if hasattr(s, "values") else s)[0] for s in SMOKES}
  covered.add("sst2_minilm")
  configs = (REPO / "configs").rglob("*.py")
  names = {str(p.relative_to(REPO / "configs").with_suffix("")) for p in configs}
  with_smoke = {n for n in names if "smoke" in getattr(load_config_module(n), "VARIANTS", ())}
  assert with_smoke <= covered, sorted(with_smoke - covered)


def test_every_smoke_variant_compiles_one_shape_per_task():
  """Each task of a smoke run has one bucket (config_lib.smoke): a handful of steps that drew
  two bucket shapes compiled the train and eval steps twice, most of the run's time."""
  names = [(s.values if hasattr(s, "values") else s)[0] for s in SMOKES] + ["sst2_minilm"]
  for name in names:
    config = load_config_module(name).get_config("smoke")
    for task, t in config.tasks.items():
      assert len(t.data.buckets) == 1, (name, task, t.data.buckets)
      assert t.data.buckets[0] >= t.data.max_length, (name, task)


def _id(smoke) -> str:
  values = smoke.values if hasattr(smoke, "values") else smoke
  return f"{values[0]}:{values[1]}"


def _run(name: str, variant: str, config, workdir) -> dict:
  if config.program == "meta":
    # Through the CLI on one device, as users run it: one episode per meta-batch does not
    # split over the 8 simulated devices the rest of the suite uses.
    cmd = [sys.executable, "-m", "research.main", f"--config=configs/{name}.py:{variant}"]
    out = subprocess.run(
      [*cmd, f"--workdir={workdir}"], cwd=REPO, env=child_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
  else:
    from research.train.trainer import train_and_evaluate

    train_and_evaluate(config, str(workdir))
  return json.loads((workdir / "results.json").read_text())


@pytest.mark.parametrize("name,variant,folder,metrics,steps", SMOKES, ids=[_id(s) for s in SMOKES])
def test_smoke_variant_runs(
  tmp_path, shared_data, minilm_dir, name, variant, folder, metrics, steps
):
  if not (shared_data / folder).is_dir():
    pytest.skip(f"{folder} not in the data directory")
  config = load_config_module(name).get_config(variant)
  results = _run(name, variant, config, tmp_path)
  assert results["steps"] == steps
  assert sorted(results["tasks"]) == sorted(metrics)
  for task, names in metrics.items():
    for metric in names:
      assert metric in results["eval"][task], (metric, results["eval"][task])
  # MiniLM (22.7M), or the CNN on MiniLM's 30,522 x 384 word embeddings (11.7M).
  # The from-scratch Transformer baseline: 9.7M.
  # A pretrained encoder-decoder's smoke run without weights: its tiny shape on MiniLM's vocab.
  tiny = dict.fromkeys(("multi30k_t5", "multi30k_bart", "multi30k_marian"), 900_000)
  smallest = {"sst2_cnn": 11_000_000, "multi30k_transformer": 9_000_000, **tiny}
  assert results["params"]["total"] > smallest.get(name, 22_000_000)
  if name == "multi30k_bert2rnd":
    # BERT2RND: MiniLM's 101 encoder leaves in, its pooler unused, the decoder and head at init.
    report = (tmp_path / "graft_report.txt").read_text()
    assert "graft: 101 transferred, 32 left at init, 2 unused in source" in report
  for task in metrics:
    if task.startswith("conll"):
      assert set(results["eval"][task]["per_type"]) >= {"PER", "ORG", "LOC", "MISC"}

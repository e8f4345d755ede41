"""Predict mode: a trained run labels a text file line by line, as eval mode does."""

import json

import jax
import numpy as np
import pytest
from train_util import REPO, load_config_module, tiny_config

from research.data import input_pipeline
from research.predict import predict_file
from research.train import checkpoints as ckpt_lib
from research.train.state import build_model
from research.train.steps import apply_model
from research.train.trainer import tokenizer_of, train_and_evaluate


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(steps=10, checkpoint_every=10, eval_every=10)
  train_and_evaluate(config, str(workdir))
  return config, workdir


def test_predict_matches_eval_mode_on_1000_lines(tiny_run, tmp_path):
  config, workdir = tiny_run
  dev = (REPO / "tests/fixtures/data/sst2/dev.tsv").read_text().splitlines()[1:]
  sentences = [line.split("\t")[0].strip() for line in dev]
  lines = [sentences[i % len(sentences)] for i in range(1000)]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  out = predict_file(workdir, tmp_path / "in.txt", tmp_path / "out.jsonl")
  records = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(records) == 1000 and [r["line"] for r in records] == list(range(1, 1001))
  # Eval mode over the dev split (same sentences, in order): the same labels and probabilities.
  data = config.tasks.sst2.data
  it = input_pipeline.build_iterator(
    data, tokenizer_of(config), "validation", batch_size=8, train=False
  )
  model, _ = build_model(config, {"sst2": 2})
  params, _ = ckpt_lib.load_params(workdir, prefer="best")
  probs = []
  for batch in it:
    logits = apply_model(model, params, batch, "sst2")
    probs.extend(np.asarray(jax.nn.softmax(logits))[batch["example_mask"] > 0])
  names = json.loads((workdir / "labels.json").read_text())["sst2"]
  for i, record in enumerate(records[: len(sentences)]):
    expected = probs[i]
    got = np.array([record["probs"][n] for n in names])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert record["label"] == names[int(np.argmax(expected))]
  assert records[len(sentences)]["probs"] == records[0]["probs"]  # Same text, same output.


def test_predict_keeps_going_past_bad_lines(tiny_run, tmp_path, caplog):
  _, workdir = tiny_run
  long_line = " ".join(["wonderful"] * 500)
  (tmp_path / "in.txt").write_bytes(
    b"a charming film\n\n\xff\xfe broken bytes\n" + long_line.encode() + b"\ntedious\n"
  )
  out = predict_file(workdir, tmp_path / "in.txt")
  records = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(records) == 5
  assert records[1] == {"line": 2, "text": "", "error": "empty line"}
  assert "not UTF-8 at byte 0" in records[2]["warning"] and "label" in records[2]
  assert "label" in records[3] and "label" in records[4]
  assert "1 line(s) longer than max_length=32 tokens were truncated" in caplog.text


def test_crossdomain_evaluates_the_trained_model_unchanged(tiny_run, tmp_path):
  from train_util import load_config_module

  _, workdir = tiny_run
  config = load_config_module("sst2_crossdomain").get_config("tiny")
  config.init_from = str(workdir)
  results = train_and_evaluate(config, str(tmp_path))
  assert results["steps"] == 0 and results["eval"]["sst2"]["examples"] == 6
  report = (tmp_path / "graft_report.txt").read_text()
  assert "41 transferred, 0 left at init, 0 unused" in report


def test_predict_tagging_spans_match_eval_mode(tmp_path):
  """NER predict mode: per-word tags (and the entity spans read off them) equal eval mode's."""
  from research.tasks import tagging

  config = load_config_module("conll03_minilm").get_config("tiny")
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir))
  blocks = (REPO / "tests/fixtures/data/conll2003/valid.txt").read_text().split("\n\n")
  sentences = [
    [line.split()[0] for line in block.splitlines() if line and not line.startswith("-DOCSTART-")]
    for block in blocks
  ]
  sentences = [s for s in sentences if s]
  (tmp_path / "in.txt").write_text("\n".join(" ".join(s) for s in sentences) + "\n")
  records = [
    json.loads(x)
    for x in predict_file(workdir, tmp_path / "in.txt", tmp_path / "out.jsonl")
    .read_text()
    .splitlines()
  ]
  names = json.loads((workdir / "labels.json").read_text())["conll03"]
  data = config.tasks.conll03.data
  it = input_pipeline.build_iterator(
    data, tokenizer_of(config), "dev", batch_size=8, train=False, encoder=tagging.Tagging.encoder
  )
  model, _ = build_model(config, {"conll03": len(names)})
  params, _ = ckpt_lib.load_params(workdir, prefer="best")
  expected = []
  for batch in it:
    pred = tagging.predict(apply_model(model, params, batch, "conll03"), batch)["label"]
    for r in np.flatnonzero(batch["example_mask"]):
      starts = np.asarray(batch["labels"][r]) != tagging.IGNORE
      expected.append([names[t] for t in np.asarray(pred[r])[starts]])
  assert len(records) == len(sentences) == len(expected)
  for record, words, tags in zip(records, sentences, expected):
    assert record["tags"] == tags and record["words"] == len(words)
    assert [(s["type"], s["start"], s["end"] - 1) for s in record["spans"]] == tagging.entities(
      tags
    )


def test_predict_from_a_multitask_run_needs_and_uses_the_task(tmp_path):
  config = load_config_module("multitask_sst2_conll").get_config("tiny")
  config.train.steps = 4
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir))
  (tmp_path / "in.txt").write_text("Alice visited Paris .\n")
  with pytest.raises(ValueError, match="multi-task run: choose --task from"):
    predict_file(workdir, tmp_path / "in.txt")
  sst2 = json.loads(predict_file(workdir, tmp_path / "in.txt", task="sst2").read_text())
  assert set(sst2["probs"]) == set(json.loads((workdir / "labels.json").read_text())["sst2"])
  ner = json.loads(predict_file(workdir, tmp_path / "in.txt", task="conll03").read_text())
  assert ner["words"] == ner["tagged"] == 4 and len(ner["tags"]) == 4


def test_predict_sentence_pairs_match_eval_mode_and_bad_lines_get_errors(tmp_path):
  """STS-B (pairs, regression): a tab-separated line scores as in eval mode; a line without
  exactly one tab, or an empty one, gets an error and the others still get their value."""
  from research import tasks

  config = load_config_module("stsb_minilm").get_config("tiny")
  config.train.steps = 4
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir))
  rows = (REPO / "tests/fixtures/data/stsb/sts-dev.csv").read_text().splitlines()[:3]
  pairs = ["\t".join(row.split("\t")[5:7]) for row in rows]
  lines = [pairs[0], "no tab in this line", "", "a\tb\tc", pairs[1], pairs[2]]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  out = predict_file(workdir, tmp_path / "in.txt", tmp_path / "out.jsonl")
  records = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert "tab" in records[1]["error"] and "tab" in records[3]["error"]
  assert records[2]["error"] == "empty line"
  data = config.tasks.stsb.data
  regression = tasks.get("regression")
  it = input_pipeline.build_iterator(
    data, tokenizer_of(config), "validation", batch_size=8, train=False, encoder=regression.encoder
  )
  batch = next(iter(it))
  assert batch["labels"].dtype == np.float32 and batch["token_type_ids"].max() == 1
  model, _ = build_model(config, {"stsb": 0})
  params, _ = ckpt_lib.load_params(workdir, prefer="best")
  values = regression.predict(apply_model(model, params, batch, "stsb"))["value"][:3]
  got = [records[i]["value"] for i in (0, 4, 5)]
  np.testing.assert_allclose(got, np.asarray(values), rtol=1e-5, atol=1e-5)

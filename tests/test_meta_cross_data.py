"""Cross-data-set meta-transfer (``meta.test_data``): meta-train on one intent data set, meta-test
on another's meta-test classes (``pytest -k cross_data``).

``configs/intent_fewshot_maml.py:tiny,test_data=clinc150``: meta-trains on the BANKING77 fixture
and meta-tests on the CLINC150 fixture's meta-test classes (2-way: that fixture has 2 classes per
class split).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_util import REPO, load_config_module

from research.data import episodes as episodes_lib
from research.data import input_pipeline
from research.meta import report, trainer
from research.train.trainer import tokenizer_of

FIXTURES = REPO / "tests" / "fixtures" / "data"


def config_of(arg: str, **meta):
  config = load_config_module("intent_fewshot_maml").get_config(arg)
  config.meta.update(meta)
  return config


def fixture_rows(name: str, tokenizer) -> dict[tuple[int, ...], str]:
  """``{token ids: class name}`` of every utterance of a fixture, tokenized independently of the
  data pipeline (the tiny configs cut at 32 tokens)."""
  rows = [json.loads(x) for x in (FIXTURES / name / "full.jsonl").read_text().splitlines()]
  ids = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=32)["input_ids"]
  return {tuple(i): r["label"] for i, r in zip(ids, rows)}


def class_split(name: str, split: str) -> set[str]:
  return set((FIXTURES / name / "few_shot" / "01" / f"labels.{split}.txt").read_text().split())


def all_batches(it) -> list[dict[str, np.ndarray]]:
  return [{k: np.asarray(v) for k, v in b.items()} for b in it]


def test_cross_data_tiny_run_meta_tests_on_the_other_data_set(tmp_path, monkeypatch, capsys):
  """Meta-train and meta-valid episodes from the BANKING77 fixture, meta-test episodes from
  CLINC150's meta-test classes; results.json says so."""
  config = config_of("tiny,test_data=clinc150,algorithm=anil")
  built = []
  build = episodes_lib.build_episode_iterator

  def spy(data_cfg, tokenizer, split, **kw):
    built.append((split, data_cfg.name, data_cfg.manual_dir, kw["seed"]))
    return build(data_cfg, tokenizer, split, **kw)

  monkeypatch.setattr(episodes_lib, "build_episode_iterator", spy)
  results = trainer.train_and_evaluate(config, str(tmp_path))
  b77, c150 = str(FIXTURES / "banking77"), str(FIXTURES / "clinc150")
  assert {(s, n, d) for s, n, d, _ in built} == {
    ("train", "banking77", b77),
    ("valid", "banking77", b77),
    ("test", "clinc150", c150),
  }
  assert {seed for s, *_, seed in built if s == "test"} == {config.meta.test_seed}
  assert results["steps"] == 4  # It meta-trained (ANIL), on BANKING77.
  saved = json.loads((tmp_path / "results.json").read_text())
  meta = saved["meta"]
  assert (meta["data"], meta["class_split_run"]) == ("banking77", "01")
  assert (meta["test_data"], meta["test_class_split_run"]) == ("clinc150", "01")
  assert saved["eval"]["banking77"]["episodes"] == 16
  assert np.load(tmp_path / "test_episode_accuracy.npy").shape == (16,)
  # metrics.jsonl's test record and the console line name the episodes' data set too.
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  (test,) = [r for r in records if r["split"] == "test"]
  assert test["test_data"] == "clinc150"
  assert "2-way 1-shot on clinc150: accuracy" in capsys.readouterr().err

  # The test episodes' utterances are CLINC150's, of its meta-test classes, labelled consistently.
  tokenizer = tokenizer_of(config)
  clinc, banking = fixture_rows("clinc150", tokenizer), fixture_rows("banking77", tokenizer)
  names = input_pipeline.label_names(trainer.test_data_config(config))
  test_classes = class_split("clinc150", "test")
  batches = all_batches(trainer.test_episode_iterator(config, tokenizer))
  assert len(batches) == 2
  seen = set()
  for b in batches:
    for part in ("support", "query"):
      ids, mask = b[f"{part}_input_ids"], b[f"{part}_attention_mask"]
      for e in range(ids.shape[0]):
        episode_classes = [names[c] for c in b["classes"][e]]
        assert set(episode_classes) <= test_classes
        for row, keep, label in zip(ids[e], mask[e], b[f"{part}_labels"][e]):
          tokens = tuple(int(t) for t in row[keep.astype(bool)])
          assert tokens in clinc and tokens not in banking
          assert clinc[tokens] == episode_classes[label]
          seen.add(clinc[tokens])
  assert seen == test_classes


@pytest.mark.parametrize("test_data", ["clinc150", "banking77"])
def test_cross_data_test_episodes_do_not_depend_on_the_training_data(test_data):
  """The same test data set and test_seed give the same episodes, token for token, whichever
  data set the run meta-trains on (so methods compare, paired, on the same episodes)."""
  # Same episode shape (tiny is 2-way only with CLINC150, whose fixture has 2 classes per split).
  on_banking = config_of(f"tiny,data=banking77,test_data={test_data}", n_way=2)
  on_clinc = config_of(f"tiny,data=clinc150,test_data={test_data}", n_way=2)
  assert list(on_banking.tasks) == ["banking77"] and list(on_clinc.tasks) == ["clinc150"]
  tokenizer = tokenizer_of(on_banking)
  a = all_batches(trainer.test_episode_iterator(on_banking, tokenizer))
  b = all_batches(trainer.test_episode_iterator(on_clinc, tokenizer))
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  # ... and they are the test data set's, not the training data set's.
  train = on_clinc if test_data == "banking77" else on_banking
  own = all_batches(trainer.episode_iterator(train, tokenizer, "test", 1234, 16))
  assert not np.array_equal(own[0]["query_input_ids"], a[0]["query_input_ids"])


@pytest.mark.parametrize("name", ["bnking77", "sst2"])
def test_cross_data_bad_test_data_name_fails_in_build(tmp_path, name, monkeypatch):
  """One line naming meta.test_data and the data sets it may name, before anything compiles."""
  compiled = []
  monkeypatch.setattr(trainer.MetaProgram, "compile", lambda *a: compiled.append(a))
  config = config_of("tiny", test_data=name)
  with pytest.raises(ValueError) as e:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"meta.test_data={name!r}")
  assert "known: ['banking77', 'clinc150']" in message
  assert not compiled and not list((tmp_path / "run").glob("*"))


def write_run(root, name: str, accs: np.ndarray, **meta) -> None:
  run = root / name
  run.mkdir()
  np.save(run / "test_episode_accuracy.npy", accs)
  meta = dict(n_way=5, k_shot=1, test_seed=1234, **meta)
  task = meta["data"]
  results = {"eval": {task: trainer.mean_ci95(accs)}, "steps": 10, "meta": meta}
  (run / "results.json").write_text(json.dumps(results))


def test_cross_data_report_keeps_cross_data_cells_apart(tmp_path, capsys):
  """Cross-data-set runs get their own column; the in-domain table is unchanged by them and by
  a results.json's ``test_data`` naming its own data set."""
  rng = np.random.default_rng(0)
  accs = {k: rng.uniform(0.2, 1.0, 40) for k in ("b_ft", "b_anil", "x_ft", "x_anil")}
  old, new = tmp_path / "old", tmp_path / "new"
  old.mkdir(), new.mkdir()
  for root, extra in ((old, {}), (new, {"test_data": "banking77"})):
    write_run(root, "b_ft", accs["b_ft"], algorithm="finetune", data="banking77", **extra)
    write_run(root, "b_anil", accs["b_anil"], algorithm="anil", data="banking77", **extra)
  in_domain = report.table(report.collect([old]))
  assert report.table(report.collect([new])) == in_domain
  assert in_domain.splitlines()[0] == "| method | banking77 5-way 1-shot |"

  cross = dict(data="clinc150", test_data="banking77")
  write_run(new, "x_ft", accs["x_ft"], algorithm="finetune", **cross)
  write_run(new, "x_anil", accs["x_anil"], algorithm="anil", **cross)
  out = tmp_path / "table.json"
  assert report.main([str(new), f"--json={out}"]) == 0
  cells = json.loads(out.read_text())
  assert list(cells) == ["banking77 5-way 1-shot", "clinc150→banking77 5-way 1-shot"]
  for col, key in (("banking77 5-way 1-shot", "b"), ("clinc150→banking77 5-way 1-shot", "x")):
    assert cells[col]["anil"]["accuracy"] == pytest.approx(accs[f"{key}_anil"].mean())
    assert cells[col]["finetune"]["accuracy"] == pytest.approx(accs[f"{key}_ft"].mean())
    d = accs[f"{key}_anil"] - accs[f"{key}_ft"]
    assert cells[col]["anil"]["vs_finetune"]["difference"] == pytest.approx(d.mean())
  printed = capsys.readouterr().out
  assert "| method | banking77 5-way 1-shot | clinc150→banking77 5-way 1-shot |" in printed

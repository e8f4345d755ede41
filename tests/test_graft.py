"""Grafting a pretrained encoder onto fresh task heads, and the path-rule helpers."""

import jax
import numpy as np
import pytest

from research import paths
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.transfer import hf
from research.transfer.graft import GraftError, graft


def test_paths_fullmatch_first_rule_wins():
  tree = {"heads": {"a": {"kernel": 1}}, "multihead": {"kernel": 2}, "encoder": {"bias": 3}}
  labels = paths.label_tree(tree, [("heads/.*", "head"), (".*kernel", "k")], default="other")
  assert labels == {
    "heads": {"a": {"kernel": "head"}},
    "multihead": {"kernel": "k"},
    "encoder": {"bias": "other"},
  }
  assert paths.unflatten(paths.flatten(tree)) == tree
  assert paths.unused_rules([("heads/.*", 1), ("decoder/.*", 2)], paths.flatten(tree)) == [
    "decoder/.*"
  ]
  with pytest.raises(ValueError, match="Rule #0 has an invalid regex"):
    paths.match([("(", 1)], "x")
  assert paths.layer_index("encoder/layer_11/ffn/output/kernel") == 11


def test_graft_minilm_into_task_model(minilm_dir, tmp_path):
  cfg, pretrained = hf.load_pretrained(minilm_dir)
  model = make_task_model(cfg, {"sst2": HeadConfig(num_labels=2)})
  fresh = init_params(model, jax.random.key(0))
  grafted, report = graft(fresh, pretrained)
  flat_pre, flat_new = paths.flatten(pretrained), paths.flatten(grafted)
  assert len(report.transferred) == len(flat_pre) == 103
  for p, x in flat_pre.items():
    np.testing.assert_array_equal(flat_new[p], x, err_msg=p)
  assert sorted(report.left_at_init) == ["heads/sst2/output/bias", "heads/sst2/output/kernel"]
  np.testing.assert_array_equal(
    flat_new["heads/sst2/output/kernel"], paths.flatten(fresh)["heads/sst2/output/kernel"]
  )
  assert report.unused_in_source == [] and report.reinitialised == []
  report.save(tmp_path / "graft_report.txt")
  text = (tmp_path / "graft_report.txt").read_text()
  assert "left at init" in text and "103 transferred, 2 left at init" in text


def test_graft_label_count_mismatch_names_path_and_shapes():
  from research.models.config import EncoderConfig

  cfg = EncoderConfig.tiny()
  three = init_params(make_task_model(cfg, {"cls": HeadConfig(num_labels=3)}), jax.random.key(1))
  two = init_params(make_task_model(cfg, {"cls": HeadConfig(num_labels=2)}), jax.random.key(2))
  everything = [("(.*)", r"\1")]
  with pytest.raises(
    GraftError,
    match=r"heads/cls/output/\w+ has shape \((32, )?2,?\) but source "
    r"heads/cls/output/\w+ has shape \((32, )?3,?\)",
  ):
    graft(two, three, everything)
  _grafted, report = graft(two, three, everything, reinit_on_mismatch=["heads/.*"])
  assert {t for t, *_ in report.reinitialised} == {
    "heads/cls/output/kernel",
    "heads/cls/output/bias",
  }
  assert len(report.transferred) == len(paths.flatten(two)) - 2


def test_graft_strict_and_none_rules():
  tree = {"encoder": {"a": np.zeros(2)}, "heads": {"t": {"b": np.zeros(3)}}}
  source = {"encoder": {"a": np.ones(2)}, "extra": {"c": np.ones(1)}}
  with pytest.raises(GraftError, match="strict graft"):
    graft(tree, source, strict=True)
  out, report = graft(tree, source, [("encoder/a", None), ("encoder/(.*)", r"encoder/\1")])
  assert report.left_at_init == ["encoder/a", "heads/t/b"]
  assert report.unused_in_source == ["encoder/a", "extra/c"]
  np.testing.assert_array_equal(out["encoder"]["a"], 0)

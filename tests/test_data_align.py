"""NER word-to-subword label alignment and tag schemes (``pytest -k align``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from research import tasks
from research.data import build_iterator, default_data_config, label_names, sources, tags, tokenize
from research.data.builders import conll
from research.tasks import tagging

FIXTURES = Path(__file__).parent / "fixtures" / "data"
TAGGING = tasks.get("tagging").encoder  # How the tagging kind reads CoNLL data.


def decode_words(batches, names):
  """Word-level tag names per real row: the labels that are not -100, in order."""
  out = []
  for b in batches:
    for row, keep in zip(b["labels"], b["example_mask"]):
      if keep:
        out.append([names[i] for i in row[row != tokenize.IGNORE]])
  return out


def test_align_labels_first_subword():
  # [CLS] Jean - Pierre Raff ##arin [SEP]: words 0 (3 pieces), 1 (2 pieces).
  word_ids = [None, 0, 0, 0, 1, 1, None]
  assert tagging.align_labels(word_ids, [3, 4]) == [-100, 3, -100, -100, 4, -100, -100]


def test_align_tag_schemes():
  iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-MISC"]
  bioes = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-MISC"]
  iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "O", "I-MISC"]
  assert tags.iob2_to_bioes(iob2) == bioes
  assert tags.to_iob2(bioes, "bioes") == iob2
  assert tags.to_iob2(iob1, "iob1") == iob2
  assert tags.convert(iob1, "iob1", "bioes") == bioes
  assert tags.tag_names(["PER", "LOC"], "bioes") == [
      "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC",
  ]  # fmt: skip
  expected = "one of O, B-X, I-X with X in ['PER']"  # what the error message says
  assert tags.check_tag("B-FOO", "iob2", ["PER"]) == expected
  assert tags.check_tag("E-PER", "iob2", ["PER"]) == expected
  assert tags.check_tag("E-PER", "bioes", ["PER"]) is None


@pytest.mark.parametrize("scheme", ["iob1", "bioes"])
def test_align_builder_reads_schemes(scheme):
  """IOB1 and BIOES files are stored as the same IOB2 tags as the IOB2 file."""
  cfg = dict(columns=("word", "POS", "chunk", "NER"), entity_types=("PER", "ORG", "LOC", "MISC"))
  ref = list(
    conll.sentences(FIXTURES / "conll_schemes" / "iob2.txt", conll.ConllConfig("a", **cfg))
  )
  got = list(
    conll.sentences(
      FIXTURES / "conll_schemes" / f"{scheme}.txt", conll.ConllConfig("b", scheme=scheme, **cfg)
    )
  )
  assert got == ref
  assert ["B-LOC", "B-LOC", "O"] in [t for _, t in ref]  # adjacent same-type entities


@pytest.mark.parametrize("scheme", ["iob2", "bioes"])
def test_align_fixture_pipeline(tmp_path, tokenizer, scheme):
  cfg = default_data_config(
    "conll2003",
    manual_dir=str(FIXTURES / "conll2003"),
    data_dir=str(tmp_path),
    verify_checksums=False,
    tag_scheme=scheme,
  )
  names = label_names(cfg, TAGGING)
  assert len(names) == (9 if scheme == "iob2" else 17)
  it = build_iterator(cfg, tokenizer, "train", batch_size=4, train=False, encoder=TAGGING)
  batches = list(it)
  for b in batches:
    assert b["labels"].shape == b["input_ids"].shape
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert (b["labels"][:, 0] == -100).all()  # [CLS]
  ref = list(conll.sentences(FIXTURES / "conll2003" / "train.txt", conll.CONFIGS[0]))
  decoded = decode_words(batches, names)
  assert len(decoded) == len(ref) == 9
  for (words, iob2), got in zip(ref, decoded):
    assert len(got) == len(words)
    assert tags.to_iob2(got, scheme) == iob2
  # The soft hyphen vanishes in the tokenizer; the word still has its own (first) subword.
  assert it._tok.stats["unk_words"] == 1


def test_align_conll2003_dev_real(shared_data, tokenizer):
  """Every CoNLL-2003 dev sentence decodes back to exactly its original tags."""
  if not (shared_data / "conll2003" / "valid.txt").is_file():
    pytest.skip("conll2003 not in ./data")
  cfg = default_data_config("conll2003")  # default data_dir: prepared once, then reused
  it = build_iterator(cfg, tokenizer, "dev", batch_size=64, train=False, encoder=TAGGING)
  decoded = decode_words(it, label_names(cfg, TAGGING))
  builder = sources.get_builder(cfg)
  ref = sources.read_columns(builder, "dev", ["tokens", "ner"])
  names = label_names(cfg, TAGGING)
  assert len(decoded) == len(ref["ner"]) == 3250
  mismatched = [
    i for i, (got, want) in enumerate(zip(decoded, ref["ner"])) if got != [names[j] for j in want]
  ]
  assert not mismatched, f"{len(mismatched)} sentences differ, e.g. #{mismatched[:5]}"
  assert it._tok.stats["truncated"] == 0
  # And the source file itself (not only what the builder stored) round-trips.
  raw = list(conll.sentences(shared_data / "conll2003" / "valid.txt", conll.CONFIGS[0]))
  assert [t for _, t in raw] == decoded
  assert np.sum([len(w) for w, _ in raw]) == 51362

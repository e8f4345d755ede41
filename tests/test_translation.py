"""Translation measured as the field measures it: cased subword vocabularies trained on the
training split, sacreBLEU / chrF with signatures on the original references, Multi30k's test
split (``pytest -k "bleu or chrf or umlaut or vocab or test_split"``)."""

import json

import numpy as np
import pytest
import sacrebleu

from research.data import default_data_config, sources, subword
from research.data.locations import repo_root
from research.tasks import seq2seq as task
from research.tasks import seq2seq_text as text

FIXTURES = repo_root() / "tests" / "fixtures" / "data"
UMLAUTS = "Über den Wolken fährt ein Mädchen Fahrrad."
HYPS = ["Ein Mann fährt Fahrrad.", "zwei Hunde spielen im Schnee", "Eine Frau liest."]
REFS = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]


def fixture_cfg(tmp_path, name="multi30k"):
  return default_data_config(
    "multi30k",
    manual_dir=str(FIXTURES / name),
    data_dir=str(tmp_path / "tfds"),
    verify_checksums=False,
  )


def test_bleu_equals_sacrebleu_corpus_bleu():
  want = sacrebleu.corpus_bleu(HYPS, [REFS])
  assert text.bleu(HYPS, REFS) == want.score
  scores = text.scores(HYPS, REFS)
  assert scores["bleu"] == want.score and 0 < scores["bleu"] < 100
  assert scores["length_ratio"] == pytest.approx(want.sys_len / want.ref_len) and 0 < want.ratio < 1
  assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|")
  assert scores["bleu_signature"].endswith(f"version:{sacrebleu.__version__}")
  # Cased: the lowercased hypothesis loses what the uncased score would keep.
  lower = [h.lower() for h in HYPS]
  assert text.bleu(lower, REFS) < scores["bleu"]
  assert text.bleu(REFS, REFS) == pytest.approx(100.0)


def test_chrf_equals_sacrebleu_corpus_chrf():
  want = sacrebleu.corpus_chrf(HYPS, [REFS])
  assert text.chrf(HYPS, REFS) == want.score
  scores = text.scores(HYPS, REFS)
  assert scores["chrf"] == want.score
  assert scores["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|")
  with pytest.raises(ValueError, match="2 hypotheses for 3 references"):
    text.scores(HYPS[:2], REFS)


def test_umlaut_sentence_round_trips_the_trained_vocabulary(tmp_path):
  """Cased, accents kept, nothing unknown: the trained tokenizer decodes to the exact text."""
  cfg = fixture_cfg(tmp_path)
  tokenizer = subword.from_json(subword.trained([(cfg, ["de"])], size=300, min_frequency=1))
  for sentence in (UMLAUTS, "Ein Mädchen in einem roten Kleid lächelt.", "ÄÖÜ äöü ß – „Zitat“"):
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == sentence
    pair = text.Tokenizers(tokenizer, tokenizer, "{}")
    assert pair.decode([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]) == sentence
  # With special tokens (an encoder's input) the sentence ends in </s>, and nothing else.
  ids = tokenizer(UMLAUTS)["input_ids"]
  assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
  assert tokenizer.convert_ids_to_tokens(list(range(4))) == list(subword.SPECIAL_TOKENS)


def test_vocab_training_is_deterministic_cached_and_reads_train_only(tmp_path, monkeypatch):
  cfg = fixture_cfg(tmp_path)
  seen = []
  train = subword.train_bpe

  def spy(texts, size, min_frequency):
    seen.append(list(texts))
    return train(seen[-1], size, min_frequency)

  monkeypatch.setattr(subword, "train_bpe", spy)
  monkeypatch.setattr(subword, "_MEMORY", {})  # Keyed by content: other tests' runs fill it.
  first = subword.trained([(cfg, ["en", "de"])], size=300, min_frequency=1)
  builder = sources.get_builder(cfg)
  cols = sources.read_columns(builder, "train", ["en", "de"])
  assert seen == [cols["en"] + cols["de"]]  # The training split only: no val sentence.
  files = list((tmp_path / "tfds" / "vocab").glob("multi30k-*.json"))
  assert len(files) == 1 and files[0].read_text(encoding="utf-8") == first
  monkeypatch.setattr(subword, "_MEMORY", {})
  assert subword.trained([(cfg, ["en", "de"])], size=300, min_frequency=1) == first
  assert len(seen) == 1  # The second call read the cached file.
  # Trained again from scratch, byte for byte the same file.
  assert train(seen[0], 300, 1) == first
  other = subword.trained([(cfg, ["de"])], size=300, min_frequency=1)
  assert other != first and len(list((tmp_path / "tfds" / "vocab").glob("*.json"))) == 2
  with pytest.raises(ValueError, match="vocab size 100 < 260"):
    train(["a"], 100)


def test_vocab_settings_are_checked():
  cfg = {"vocab": {"target": "bpe", "size": 8000}}
  assert text.vocab_settings(cfg)["source"] == "pretrained"
  assert text.vocab_settings({})["target"] == "pretrained"
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['sise'\]"):
    text.vocab_settings({"vocab": {"sise": 8000}})
  with pytest.raises(ValueError, match=r"vocab\.source='joint' needs a trained target"):
    text.vocab_settings({"vocab": {"source": "joint"}})


def test_vocab_pair_encodes_each_side_with_its_own_tokenizer(tmp_path, tokenizer):
  """BERT2RND: MiniLM's WordPiece for the English source, the cased BPE for the German target."""
  cfg = fixture_cfg(tmp_path)
  target = subword.from_json(subword.trained([(cfg, ["de"])], size=300, min_frequency=1))
  pair = text.Tokenizers(tokenizer, target, "{}")
  tok = task.encode_pairs(pair, ["A girl is smiling."], [UMLAUTS], 32, 32)
  src = tok.ragged["input_ids"][0]
  assert src[0] == tokenizer.cls_token_id and src[-1] == tokenizer.sep_token_id
  assert tok.pad_values["input_ids"] == tokenizer.pad_token_id
  dec, labels = tok.ragged["decoder_input_ids"][0], tok.ragged["labels"][0]
  assert dec[0] == target.bos_token_id and labels[-1] == target.eos_token_id
  np.testing.assert_array_equal(dec[1:], labels[:-1])
  assert pair.decode(labels) == UMLAUTS
  # The cache key of tokenized splits covers both vocabularies.
  from research.data.tokenize import tokenizer_fingerprint

  other = text.Tokenizers(tokenizer, tokenizer)
  assert tokenizer_fingerprint(pair) != tokenizer_fingerprint(other)


def test_test_split_appears_with_test_2016_files(tmp_path, tokenizer):
  """Multi30k's test_2016_flickr files are not shared here; when present, 'test' is a split."""
  assert not (FIXTURES / "multi30k" / "test_2016_flickr.de.gz").exists()
  cfg = fixture_cfg(tmp_path, "multi30k_test2016")
  builder = sources.get_builder(cfg)
  sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  assert sizes == {"train": 8, "validation": 3, "test": 3}
  cols = sources.read_columns(builder, "test", ["en", "de"])
  assert cols["de"][1] == UMLAUTS and cols["en"][0] == "A boy jumps into a lake."
  cfg.splits.eval = "test"
  assert text.reference_texts(cfg) == cols["de"]  # What evaluation on test scores against.
  from research.data import build_iterator

  seq2seq = task.Seq2Seq.encoder
  batches = list(build_iterator(cfg, tokenizer, "test", batch_size=4, train=False, encoder=seq2seq))
  assert [b["example_mask"].tolist() for b in batches] == [[1, 1, 1, 0]]
  # Without the files (the shared copy), no test split.
  plain = sources.get_builder(fixture_cfg(tmp_path))
  assert sorted(plain.info.splits.keys()) == ["train", "validation"]


def test_bleu_and_chrf_scores_hold_the_results_json_keys():
  """The keys the Multi30k tables read from results.json (docs/design.md)."""
  from research.tasks.seq2seq import METRICS

  assert {"bleu", "chrf", "length_ratio"} <= set(METRICS)
  assert json.loads(json.dumps(text.scores(HYPS, REFS))).keys() >= {
    "bleu",
    "bleu_signature",
    "chrf",
    "chrf_signature",
    "length_ratio",
  }

"""tfds builders for local files: tiny committed fixtures, the real ./data copies, bad input.

Select with ``pytest -k builder``. Real-data tests prepare into a fresh temporary data_dir and
skip when ./data lacks the data set.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

from research import tasks
from research.data import default_data_config, label_names, sources
from research.data.builders.common import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def fixture_cfg(name: str, tmp_path: Path, manual_dir: str | None = None, **kw):
  return default_data_config(
    name,
    manual_dir=str(FIXTURES / (manual_dir or name)),
    data_dir=str(tmp_path / "tfds"),
    verify_checksums=False,
    **kw,
  )


def split_sizes(cfg) -> dict[str, int]:
  builder = sources.get_builder(cfg)
  return {name: info.num_examples for name, info in builder.info.splits.items()}


def test_builder_sst2_fixture(tmp_path):
  cfg = fixture_cfg("sst2", tmp_path)
  assert split_sizes(cfg) == {"train": 40, "validation": 5}
  assert label_names(cfg) == ["negative", "positive"]
  builder = sources.get_builder(cfg)
  cols = sources.read_columns(builder, "validation", ["text", "label"])
  assert cols["text"][0] == "a charming mess"  # file order kept, trailing space stripped
  assert cols["label"][:2] == [1, 0]
  assert "tensorflow" not in sys.modules  # prepared and read without TensorFlow


def test_builder_conll_fixtures(tmp_path):
  cfg = fixture_cfg("conll2003", tmp_path)
  assert split_sizes(cfg) == {"train": 9, "dev": 4}  # -DOCSTART- lines are not sentences
  cols = sources.read_columns(sources.get_builder(cfg), "train", ["tokens", "ner"])
  assert cols["tokens"][0] == ["Alice", "Smith", "visited", "Paris", "."]
  names = label_names(cfg, tasks.get("tagging").encoder)
  assert [names[i] for i in cols["ner"][0]] == ["B-PER", "I-PER", "O", "B-LOC", "O"]
  es = fixture_cfg("conll2002_es", tmp_path)
  assert split_sizes(es) == {"train": 4, "dev": 2}
  words = sources.read_columns(sources.get_builder(es), "train", ["tokens"])["tokens"]
  assert "Comisión" in words[1] and "Núñez" in words[1]  # latin-1 decoded


def test_builder_parallel_fixture(tmp_path):
  cfg = fixture_cfg("multi30k", tmp_path)
  assert split_sizes(cfg) == {"train": 8, "validation": 3}
  cols = sources.read_columns(sources.get_builder(cfg), "validation", ["en", "de"])
  assert cols["en"][0] == "A man is riding a bike." and cols["de"][0] == "Ein Mann fährt Fahrrad."


def test_builder_intents_fixtures(tmp_path):
  cfg = fixture_cfg("banking77", tmp_path)
  assert split_sizes(cfg) == {"full": 61}
  assert len(label_names(cfg)) == 9 and label_names(cfg) == sorted(label_names(cfg))
  clinc = fixture_cfg("clinc150", tmp_path)
  assert split_sizes(clinc) == {"full": 48}
  original = default_data_config(
    "clinc150",
    tfds_name="local_intents/clinc150_full_json",
    manual_dir=str(FIXTURES / "clinc150_json"),
    data_dir=str(tmp_path / "tfds"),
    splits=dict(train="train", eval="validation"),
  )
  assert split_sizes(original) == {"train": 30, "validation": 10, "test": 8}  # no oos_*
  assert label_names(original) == label_names(clinc)


def test_builder_classification_fixtures(tmp_path):
  ag = fixture_cfg("ag_news", tmp_path)
  assert split_sizes(ag) == {"train": 12, "test": 8}
  assert label_names(ag) == ["World", "Sports", "Business", "Sci/Tech"]
  cols = sources.read_columns(sources.get_builder(ag), "test", ["text", "label"])
  assert cols["label"][:4] == [0, 1, 2, 3]  # classes 1-4 in the CSV map to names
  assert '"breakthrough"' in cols["text"][0]  # CSV quoting undone
  for domain in ("amazon", "imdb", "yelp"):
    cfg = fixture_cfg(f"sentiment_{domain}", tmp_path, manual_dir="sentiment_labelled_sentences")
    assert split_sizes(cfg) == {"test": 6}
    assert label_names(cfg) == ["negative", "positive"]


def test_builder_fast_reader_matches_tfds_decoding(tmp_path):
  for name, keys in (("conll2003", ["tokens", "ner"]), ("sst2", ["text", "label"])):
    builder = sources.get_builder(fixture_cfg(name, tmp_path))
    split = next(iter(builder.info.splits.keys()))
    fast = sources._fast_raw(builder, split, keys)
    source = builder.as_data_source(split)
    slow = sources._read_decoded(source, len(source))
    feats = builder.info.features
    for k in keys:
      want = [sources._convert(r[k], feats[k]) for r in slow]
      assert [
        list(x) if hasattr(x, "__len__") and not isinstance(x, str) else x for x in fast[k]
      ] == [list(x) if hasattr(x, "__len__") and not isinstance(x, str) else x for x in want]


def test_builder_prepares_once_and_keeps_inputs_apart(tmp_path):
  """A second build reuses the prepared data; other raw files are prepared elsewhere."""
  cfg = fixture_cfg("sst2", tmp_path)
  first = sources.get_builder(cfg)
  stamp = Path(first.data_dir, "dataset_info.json").stat().st_mtime_ns
  again = sources.get_builder(cfg)
  assert again.data_dir == first.data_dir
  assert Path(again.data_dir, "dataset_info.json").stat().st_mtime_ns == stamp
  edited = tmp_path / "edited"
  edited.mkdir()
  for f in ("train.tsv", "dev.tsv"):
    (edited / f).write_text((FIXTURES / "sst2" / f).read_text())
  with open(edited / "dev.tsv", "a") as f:
    f.write("one more line \t1\n")
  other = sources.get_builder(fixture_cfg("sst2", tmp_path, manual_dir=str(edited)))
  assert other.data_dir != first.data_dir
  assert other.info.splits["validation"].num_examples == 6


# --- Bad input: every error names file:line and what was expected. -------------------------


def write(dirpath: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
  dirpath.mkdir(parents=True, exist_ok=True)
  (dirpath / name).write_text(text, encoding=encoding)
  return dirpath


def prepare_error(name: str, manual_dir: Path, tmp_path: Path) -> str:
  cfg = fixture_cfg(name, tmp_path, manual_dir=str(manual_dir))
  with pytest.raises(InputError) as e:
    sources.get_builder(cfg)
  return str(e.value)


def test_builder_prepared_by_another_process_while_waiting_has_its_splits(tmp_path, monkeypatch):
  """Two processes start on an unprepared set: the one that waits for the lock while the other
  prepares gets a builder with the splits on disk, not the empty one it made before waiting."""
  import contextlib

  cfg = fixture_cfg("sst2", tmp_path)
  real_lock = sources._file_lock

  @contextlib.contextmanager
  def lock_won_by_another_process(path):
    monkeypatch.setattr(sources, "_file_lock", real_lock)
    sources.get_builder(cfg)  # The other process: prepares while this one waits.
    with real_lock(path):
      yield

  monkeypatch.setattr(sources, "_file_lock", lock_won_by_another_process)
  builder = sources.get_builder(cfg)
  assert builder.info.splits["train"].num_examples == 40
  assert len(sources.read_columns(builder, "validation", ["text"])["text"]) == 5


def test_builder_bad_tsv_missing_column(tmp_path):
  d = write(tmp_path / "raw", "train.tsv", "sentence\tlabel\ngood film \t1\nno label here\n")
  msg = prepare_error("sst2", d, tmp_path)
  assert f"{d / 'train.tsv'}:3:" in msg
  assert "expected 2 tab-separated columns (sentence, label), found 1" in msg


def test_builder_bad_tsv_unknown_label(tmp_path):
  d = write(tmp_path / "raw", "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t2\n")
  msg = prepare_error("sst2", d, tmp_path)
  assert f"{d / 'train.tsv'}:3:" in msg and "unknown label '2'; expected one of ['0', '1']" in msg


def test_builder_bad_csv_unknown_label(tmp_path):
  d = write(tmp_path / "raw", "test.csv", '"1","t","d"\n"5","t","d"\n')
  msg = prepare_error("ag_news", d, tmp_path)
  assert f"{d / 'test.csv'}:2:" in msg and "unknown label '5'" in msg


def test_builder_bad_empty_files(tmp_path):
  for name, file in (
    ("sst2", "train.tsv"),
    ("conll2003", "train.txt"),
    ("banking77", "full.jsonl"),
    ("ag_news", "test.csv"),
  ):
    d = write(tmp_path / f"raw_{name}", file, "")
    msg = prepare_error(name, d, tmp_path)
    assert f"{d / file}: empty file" in msg


def test_builder_bad_conll_column_count(tmp_path):
  text = "-DOCSTART- -X- -X- O\n\nEU NNP I-NP B-ORG\nrejects VBZ I-VP\n"
  d = write(tmp_path / "raw", "train.txt", text)
  msg = prepare_error("conll2003", d, tmp_path)
  assert f"{d / 'train.txt'}:4:" in msg
  assert "expected 4 space-separated columns (word POS chunk NER), found 3" in msg


def test_builder_bad_conll_unknown_tag(tmp_path):
  d = write(tmp_path / "raw", "train.txt", "EU NNP I-NP B-ORG\nrejects VBZ I-VP B-FOO\n")
  msg = prepare_error("conll2003", d, tmp_path)
  assert f"{d / 'train.txt'}:2:" in msg and "unknown tag 'B-FOO'" in msg


def test_builder_bad_jsonl(tmp_path):
  d = write(tmp_path / "raw", "full.jsonl", '{"sentence": "hi", "label": "a"}\n{"sentence": "x"}\n')
  msg = prepare_error("banking77", d, tmp_path)
  assert f"{d / 'full.jsonl'}:2:" in msg and "missing or empty 'label'" in msg
  d = write(tmp_path / "raw2", "full.jsonl", '{"sentence": "hi", "label": "a"}\n{oops\n')
  assert f"{d / 'full.jsonl'}:2: invalid JSON" in prepare_error("banking77", d, tmp_path)


def test_builder_bad_class_split(tmp_path):
  d = write(tmp_path / "raw", "full.jsonl", '{"sentence": "hi", "label": "a"}\n')
  for split, text in (("train", "a\n"), ("valid", "b\n"), ("test", "a\n")):
    write(d / "few_shot" / "01", f"labels.{split}.txt", text)
  msg = prepare_error("banking77", d, tmp_path)
  assert "labels.valid.txt:1: class 'b' has no examples" in msg


def test_builder_bad_parallel_lengths(tmp_path):
  d = tmp_path / "raw"
  d.mkdir()
  for lang, lines in (("en", ["a", "b", "c"]), ("de", ["x", "y"])):
    with gzip.open(d / f"train.{lang}.gz", "wt", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  msg = prepare_error("multi30k", d, tmp_path)
  assert f"{d / 'train.en.gz'}:3: has more lines than train.de.gz (2)" in msg


def test_builder_checksum_mismatch(tmp_path, monkeypatch):
  """The registry's own folder must hold the published files (here: the fixture does not)."""
  root = tmp_path / "data"
  for f in ("train.tsv", "dev.tsv"):
    write(root / "sst2", f, (FIXTURES / "sst2" / f).read_text())
  monkeypatch.setenv("RESEARCH_DATA_DIR", str(root))
  cfg = default_data_config("sst2", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(InputError, match=r"dev.tsv: sha256 \w+ differs from the published copy"):
    sources.get_builder(cfg)
  cfg.verify_checksums = False
  assert sources.get_builder(cfg).info.splits["train"].num_examples == 40


def test_builder_missing_manual_dir(tmp_path):
  cfg = fixture_cfg("sst2", tmp_path, manual_dir=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.get_builder(cfg)


# --- The real copies in ./data (prepared once into the default data_dir, then reused). -------

PUBLISHED = {
  "sst2": {"train": 67349, "validation": 872},
  "conll2003": {"train": 14041, "dev": 3250},
  "conll2002_es": {"train": 8323, "dev": 1915},
  "multi30k": {"train": 29000, "validation": 1014},
  "banking77": {"full": 13083},
  "clinc150": {"full": 22500},
  "ag_news": {"train": 10001, "test": 7600},
  "sentiment_amazon": {"test": 1000},
  "sentiment_imdb": {"test": 1000},
  "sentiment_yelp": {"test": 1000},
  "stsb": {"train": 5749, "validation": 1500},
  "mrpc": {"train": 3668, "validation": 408},
}

# Label / entity counts per split, as published in data/*/README.md (which has AG News
# Sci/Tech at 2,537 in a 10,001-row file: the file holds 2,538, so 2,538 here).
COUNTS = {
  "sst2": ("label", {"train": [29780, 37569], "validation": [428, 444]}),
  "ag_news": ("label", {"train": [2509, 2458, 2496, 2538], "test": [1900] * 4}),
  "sentiment_yelp": ("label", {"test": [500, 500]}),
  "mrpc": ("label", {"train": [1194, 2474], "validation": [129, 279]}),
  # B- tags per type, in label order PER, ORG, LOC, MISC.
  "conll2003": ("ner", {"train": [6600, 6321, 7140, 3438], "dev": [1842, 1341, 1837, 922]}),
  "conll2002_es": ("ner", {"train": [4321, 7390, 4913, 2173], "dev": [1222, 1700, 984, 445]}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builder_real_split_sizes(shared_data, name):
  cfg = default_data_config(name)
  folder = shared_data / cfg.manual_dir
  if not folder.is_dir():
    pytest.skip(f"{cfg.manual_dir} not in {shared_data}")
  builder = sources.get_builder(cfg)  # verifies the published sha256 of every input file
  assert split_sizes(cfg) == PUBLISHED[name]
  assert builder.info.metadata["inputs"]
  if name in COUNTS:
    key, want = COUNTS[name]
    for split, counts in want.items():
      values = sources.read_columns(builder, split, [key])[key]
      if key == "ner":
        names = label_names(cfg, tasks.get("tagging").encoder)
        flat = np.concatenate(values)
        got = [int(np.sum(flat == names.index(f"B-{t}"))) for t in ("PER", "ORG", "LOC", "MISC")]
      else:
        got = np.bincount(values, minlength=len(counts)).tolist()
      assert got == counts, (split, got)


def test_builder_sentence_pair_fixtures(tmp_path):
  stsb = fixture_cfg("stsb", tmp_path)
  assert split_sizes(stsb) == {"train": 40, "validation": 16}
  cols = sources.read_columns(sources.get_builder(stsb), "train", ["text", "text_pair", "label"])
  assert cols["text"][0] == "A plane is taking off."
  assert cols["text_pair"][0] == "An air plane is taking off."
  assert cols["label"][:2] == pytest.approx([5.0, 3.8]) and all(
    isinstance(x, float) for x in cols["label"]
  )
  assert cols["text"][30] and cols["text_pair"][30]  # a row with 2 extra columns: 6-7 read
  assert label_names(stsb, tasks.get("regression").encoder) == []
  mrpc = fixture_cfg("mrpc", tmp_path)
  assert split_sizes(mrpc) == {"train": 40, "validation": 16}
  assert label_names(mrpc) == ["not_paraphrase", "paraphrase"]
  cols = sources.read_columns(sources.get_builder(mrpc), "train", ["text", "text_pair", "label"])
  assert cols["label"][:2] == [1, 0] and cols["text"][0].startswith("Amrozi accused")


@pytest.mark.parametrize(
  "name,file,line,message",
  [
    ("stsb", "genre\tf\t2012\t1\t4.0\tonly one sentence\n", 1, "expected 7 to 9"),
    ("stsb", "g\tf\t2012\t1\tfive\ta\tb\n", 1, "score 'five' is not a number"),
    ("stsb", "g\tf\t2012\t1\t4.0\ta\tb\ng\tf\t2012\t2\t7.5\ta\tb\n", 2, "outside"),
    ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n2\t1\t2\ta\tb\n", 2, "label"),
    ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t \tb\n", 2, "empty"),
  ],
)
def test_builder_sentence_pairs_bad_rows(tmp_path, name, file, line, message):
  from research.data.builders import sentence_pairs

  config = next(c for c in sentence_pairs.CONFIGS if c.name == name)
  spec = config.files["train"]
  path = tmp_path / spec["file"]
  path.write_text(file)
  with pytest.raises(InputError, match=message) as e:
    list(sentence_pairs.generate(path, spec, config))
  assert e.value.path == str(path) and e.value.line == line
  assert str(e.value).startswith(f"{path}:{line}:")

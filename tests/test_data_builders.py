"""tfds builders for local files: tiny committed fixtures, the real ./data copies, bad input.

Select with ``pytest -k builder``. Real-data tests prepare into a fresh temporary data_dir and
skip when ./data lacks the data set.
"""

from __future__ import annotations

from pathlib import Path

from research.data import default_data_config, label_names, sources

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

"""Data-set configs: ``default_data_config(name)`` returns a data set's ``data_cfg`` ConfigDict.

Fields of ``data_cfg`` (every data set has all of them, so overrides are typo-checked):

- ``name``: registry key below (used in messages and caches).
- ``task``: the task kind the data set is labelled for (``'classification'``, ``'regression'``,
  ``'tagging'``, ``'seq2seq'``, ...): informative; the kind of ``config.tasks.<name>.kind``
  decides how a run reads the data (research.tasks), and checks the fields it needs.
- ``source``: ``'local'`` (our tfds builders over raw files in ``data/``) or ``'catalog'`` (a
  tfds catalog data set, downloaded by tfds on a machine with internet).
- ``tfds_name``: ``'<builder>/<config>'``, e.g. ``'local_text_classification/sst2'`` or
  ``'glue/sst2'``.
- ``manual_dir``: folder of the raw files, relative to the data root (``$RESEARCH_DATA_DIR`` or
  ``./data``) unless absolute. Local sources only.
- ``data_dir``: prepared ArrayRecord data; ``''``: ``$RESEARCH_TFDS_DIR`` or ``./.tfds``.
- ``verify_checksums``: compare raw files with the published sha256 (only when ``manual_dir`` is
  the registry's folder; an overridden ``manual_dir`` holds other files on purpose). Raw files
  that are not the published copy are prepared apart, under ``<data_dir>/custom/<digest>``.
- ``download``: catalog sources only: let tfds download and prepare when not prepared yet.
- ``splits.train`` / ``splits.eval``: the split names a trainer should use by default.
- ``text_key``, ``text_pair_key`` (``''`` = single text), ``label_key``: classification features.
- ``tokens_key``, ``tags_key``: tagging features (a word sequence and its tag ids).
- ``tag_scheme``: tagging target scheme, ``'iob2'`` or ``'bioes'`` (sources are converted).
- ``source_key``, ``target_key``: seq2seq features (e.g. ``'en'``, ``'de'``).
- ``max_length``: truncation length in tokens, special tokens included (source side for seq2seq;
  both texts together for pairs).
- ``target_max_length``: seq2seq target truncation, counting the BOS/EOS token it gets.
- ``buckets``: sorted padded lengths; every batch is padded to the smallest bucket holding its
  longest row, so jit sees at most ``len(buckets)`` shapes (seq2seq: source and target share the
  bucket). ``buckets[-1]`` must be >= ``max_length`` (and ``target_max_length``).
- ``pool_batches``: training batches are formed from pools of ``pool_batches * batch_size``
  shuffled examples sorted by length (less padding; more = less padding, less randomness).
- ``packing``: training batches lay several examples end to end in each row, kept apart by
  segment ids (research.data.packing); ``train.batch_size`` then counts rows. Rows are as wide
  as the smallest bucket holding ``max_length``. Evaluation is never packed.
- ``packing_max_per_row``: the most examples one packed row holds (K: per-example batch fields
  and outputs are ``[rows, K]``).
- ``num_threads``, ``prefetch``: grain read threads and prefetch buffer (batches).
- ``cache_tokenized``: keep tokenized splits as ``.npz`` under ``<data_dir>/tokenized``.
- ``few_shot.run``: intent sets: which published class split (``'01'``..``'05'``) the episode
  sampler uses (stored with the prepared data set, see :mod:`research.data.episodes`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

_BUCKETS = (16, 24, 32, 48, 64, 96, 128)


def _base() -> dict[str, Any]:
  return dict(
    name="",
    task="classification",
    source="local",
    tfds_name="",
    manual_dir="",
    data_dir="",
    verify_checksums=True,
    download=True,
    splits=ml_collections.ConfigDict(dict(train="train", eval="validation")),
    text_key="text",
    text_pair_key="",
    label_key="label",
    tokens_key="tokens",
    tags_key="ner",
    tag_scheme="iob2",
    source_key="",
    target_key="",
    max_length=128,
    target_max_length=128,
    buckets=_BUCKETS,
    pool_batches=64,
    packing=False,
    packing_max_per_row=16,
    num_threads=2,
    prefetch=4,
    cache_tokenized=True,
    few_shot=ml_collections.ConfigDict(dict(run="", label_file="")),
  )


def _classification(tfds_name: str, manual_dir: str, train: str, eval_: str, **kw: Any):
  return dict(
    tfds_name=f"local_text_classification/{tfds_name}",
    manual_dir=manual_dir,
    splits=dict(train=train, eval=eval_),
    **kw,
  )


def _tagging(tfds_name: str, manual_dir: str, **kw: Any):
  return dict(
    task="tagging",
    tfds_name=f"local_conll/{tfds_name}",
    manual_dir=manual_dir,
    splits=dict(train="train", eval="dev"),
    buckets=(32, 48, 64, 96, 128, 192, 256),
    max_length=256,
    **kw,
  )


def _pairs(task: str, name: str):
  return dict(
    task=task,
    tfds_name=f"local_sentence_pairs/{name}",
    manual_dir=name,
    text_pair_key="text_pair",
    splits=dict(train="train", eval="validation"),
    buckets=(24, 32, 48, 64, 96, 128),
  )


def _intents(name: str, max_length: int = 64):
  return dict(
    tfds_name=f"local_intents/{name}",
    manual_dir=name,
    splits=dict(train="full", eval="full"),
    max_length=max_length,
    buckets=(16, 24, 32, 48, 64),
    few_shot=dict(run="01", label_file="few_shot/{run}/labels.{split}.txt"),
  )


# name -> overrides of _base(). Local sets read ./data/<manual_dir>; catalog sets need tfds' own
# download (or tfds.testing.mock_data in tests).
DATASETS: dict[str, dict[str, Any]] = {
  # SST-2 is mostly short phrases (median 10 tokens): fine buckets keep padding near 20%.
  "sst2": _classification(
    "sst2", "sst2", "train", "validation", buckets=(8, 12, 16, 24, 32, 48, 64, 128)
  ),
  "ag_news": _classification("ag_news", "ag_news", "train", "test"),
  "sentiment_amazon": _classification(
    "sentiment_amazon", "sentiment_labelled_sentences", "test", "test"
  ),
  "sentiment_imdb": _classification(
    "sentiment_imdb", "sentiment_labelled_sentences", "test", "test"
  ),
  "sentiment_yelp": _classification(
    "sentiment_yelp", "sentiment_labelled_sentences", "test", "test"
  ),
  "conll2003": _tagging("conll2003", "conll2003"),
  "conll2002_es": _tagging("conll2002_es", "conll2002_es"),
  "multi30k": dict(
    task="seq2seq",
    tfds_name="local_parallel_text/multi30k_en_de",
    manual_dir="multi30k",
    source_key="en",
    target_key="de",
    max_length=64,
    target_max_length=64,
    buckets=(16, 24, 32, 48, 64),
  ),
  # Sentence pairs: one input of both sentences ([CLS] a [SEP] b [SEP]), bucketed on its length.
  "stsb": _pairs("regression", "stsb"),
  "mrpc": _pairs("classification", "mrpc"),
  "banking77": _intents("banking77"),
  "clinc150": _intents("clinc150"),
  # tfds catalog data sets (same pipeline; features named as in the catalog).
  "glue_sst2": dict(
    source="catalog",
    tfds_name="glue/sst2",
    text_key="sentence",
    buckets=(8, 12, 16, 24, 32, 48, 64, 128),  # The local copy's ("sst2").
  ),
  "imdb_reviews": dict(
    source="catalog",
    tfds_name="imdb_reviews/plain_text",
    splits=dict(train="train", eval="test"),
    max_length=512,
    buckets=(64, 128, 256, 384, 512),
  ),
  "conll2003_catalog": dict(
    task="tagging",
    source="catalog",
    tfds_name="conll2003",
    splits=dict(train="train", eval="dev"),
    buckets=(32, 48, 64, 96, 128, 192, 256),
    max_length=256,
  ),
  "wmt14_de_en": dict(
    task="seq2seq",
    source="catalog",
    tfds_name="wmt14_translate/de-en",
    source_key="en",
    target_key="de",
    max_length=128,
    target_max_length=128,
  ),
}


def names() -> list[str]:
  """The registered data-set names."""
  return sorted(DATASETS)


def default_data_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The ``data_cfg`` of a registered data set, with optional top-level overrides.

  Args:
    name: a key of :data:`DATASETS`, e.g. ``'sst2'``, ``'conll2003'``, ``'multi30k'``.
    **overrides: field values to replace (e.g. ``manual_dir=..., data_dir=...``).

  Returns:
    An unlocked ``ml_collections.ConfigDict`` with every field of the module docstring.

  Raises:
    KeyError: for an unknown name or override field.
  """
  if name not in DATASETS:
    raise KeyError(f"Unknown data set {name!r}; known: {names()}.")
  cfg = ml_collections.ConfigDict(_base())
  cfg.update(dict(name=name, **DATASETS[name]))
  for key, value in overrides.items():
    if key not in cfg:
      raise KeyError(f"data_cfg has no field {key!r}; fields: {sorted(cfg.keys())}.")
    cfg[key] = value
  validate(cfg)
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks a ``data_cfg`` for contradictions before anything is read.

  Raises:
    ValueError: naming the offending field.
  """
  if cfg.source not in ("local", "catalog"):
    raise ValueError(f"data_cfg.source={cfg.source!r}; expected 'local' or 'catalog'.")
  buckets = tuple(cfg.buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2:
    raise ValueError(f"data_cfg.buckets={buckets} must be strictly increasing lengths >= 2.")
  check_bucket_limit(cfg, cfg.max_length, "max_length")
  if cfg.get("packing", False) and cfg.get("packing_max_per_row", 1) < 1:
    raise ValueError(f"data_cfg.packing_max_per_row={cfg.packing_max_per_row} must be >= 1.")


def check_bucket_limit(cfg: ml_collections.ConfigDict, limit: int, field: str) -> None:
  """Raises ValueError when the largest bucket cannot hold a row of ``limit`` tokens."""
  if cfg.buckets[-1] < limit:
    raise ValueError(
      f"data_cfg.buckets[-1]={cfg.buckets[-1]} is shorter than the longest allowed row ({limit}: "
      f"{field}); add a bucket or lower {field}."
    )

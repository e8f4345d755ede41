r"""Cross-domain sentiment: the SST-2 model, unchanged, evaluated on Amazon / IMDb / Yelp.

The transfer-to-new-data case: train once on SST-2 (configs/sst2_minilm.py), then measure how
the classifier carries over to the UCI Sentiment Labelled Sentences (1,000 per domain, the
same negative/positive labels). Nothing is trained (``train.steps=0``); the whole trained tree
(encoder and the ``sst2`` head) is grafted from the SST-2 run.

  python -m research.main --config=configs/sst2_crossdomain.py:domain=amazon \
      --workdir=runs/sst2_crossdomain/amazon --config.init_from=runs/sst2_minilm
  python -m launch.local --config=configs/sst2_crossdomain.py --sweep --workdir=runs \
      --config.init_from=runs/sst2_minilm

Variants: ``domain=amazon|imdb|yelp``; ``smoke`` (MiniLM with an untrained head instead of the
SST-2 run, 200 sentences: checks the path, not the accuracy); ``tiny`` evaluates the 2-layer
fixture model.
Numbers are in docs/results.md.
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "domain=imdb", "domain=yelp", "smoke", "tiny")
DOMAINS = ("amazon", "imdb", "yelp")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, domain="amazon", smoke=False, tiny=False)
  if arg.domain not in DOMAINS:
    raise ValueError(f"domain={arg.domain!r}: expected one of {DOMAINS}")
  c = config_lib.base_config()
  c.experiment = "sst2_crossdomain"
  c.init_from = "runs/sst2_minilm"  # The trained SST-2 run (its best params).
  c.model.graft_rules = (("(.*)", r"\1"),)  # Encoder and the sst2 head, as trained.
  c.model.strict_graft = True
  c.tasks.sst2 = config_lib.task(
    "classification", default_data_config(f"sentiment_{arg.domain}"), pooling="pooler"
  )
  c.train.update(steps=0, eval_every=1, checkpoint_every=0)
  c.eval.batch_size = 64
  if arg.smoke:
    c.init_from = ""  # The pretrained encoder and a fresh head: no SST-2 run needed.
    c.model.graft_rules = (("encoder/(.*)", r"encoder/\1"),)
    c.model.strict_graft = False
    data = c.tasks.sst2.data
    data.update(max_length=64, buckets=(64,))  # One eval shape: one compile.
    data.splits.eval = f"{data.splits.eval}[:200]"
  if arg.tiny:
    config_lib.make_tiny(c, "sst2", fixture="sentiment_labelled_sentences", steps=0)
  return config_lib.lock(c)


def get_sweep():
  """All three domains (the data set's name and tfds name move together)."""
  names = [f"sentiment_{d}" for d in DOMAINS]
  return config_lib.zipped(
    config_lib.axis("tasks.sst2.data.name", dict(zip(DOMAINS, names)), name="domain"),
    config_lib.axis(
      "tasks.sst2.data.tfds_name",
      {d: f"local_text_classification/{n}" for d, n in zip(DOMAINS, names)},
      name="tfds",
    ),
  )

r"""SST-2 sentiment on a pretrained T5, two ways: label words from the decoder, or a pooled head.

  python -m research.main --config=configs/sst2_t5.py --workdir=runs/sst2_t5
  python -m research.main --config=configs/sst2_t5.py:head=encoder --workdir=runs/sst2_t5_enc
  python -m research.main --config=configs/sst2_t5.py:checkpoint=google-t5/t5-base \
    --workdir=runs/sst2_t5_base
  python -m research.main --config=configs/sst2_t5.py:tiny --workdir=/tmp/sst2_t5_tiny
  python -m research.main --mode=predict --workdir=runs/sst2_t5 --input=sentences.txt

``head=decoder`` (the default) is T5's own way (task kind ``text_to_text``): the whole model
reads ``"sst2 sentence: <text>"`` and is trained to write ``negative`` / ``positive`` (the data
set's label names, T5's GLUE words; ``--config.tasks.sst2.label_words.positive=great`` picks
others), and is evaluated by rank classification: the label whose word has the higher summed
log-likelihood. ``head=encoder`` is the other way, for comparison on the same data, schedule and
checkpoint: kind ``classification`` on the T5 encoder alone, mean-pooled, with a new linear head
(the decoder's weights show up as unused in the graft report). Both report ``accuracy`` and
``f1``. Schedule: 2000 steps of 32, AdamW at 3e-4 (the usual peak for fine-tuning t5-small)
with 6% warmup and linear decay, eval every 500 steps.

Variants (comma-separated): ``tiny`` (a random 2-layer T5 of width 32 on MiniLM's tokenizer and
the committed SST-2 fixture, made in-process, seconds on CPU; for tests),
``tiny,checkpoint=DIR`` (the tiny schedule on the fixture from the weights in DIR),
``head=encoder``, ``checkpoint=ID`` (an HF directory or hub id of model type t5, mt5 or umt5;
default ``google-t5/t5-small``, downloaded into the huggingface_hub cache on first use),
``lr=X``. No ``smoke`` variant: a smoke run means real weights, and no T5 checkpoint ships
with the offline packages here. Reached: not run on real weights here (no numbers yet).
"""

from research import config_lib
from research.data.registry import default_data_config

CHECKPOINT = "google-t5/t5-small"
LR = 3e-4
HEADS = ("decoder", "encoder")
PREFIX = "sst2 sentence: "  # T5's GLUE prompt for SST-2.

VARIANTS = (
  "",
  "tiny",
  "tiny,head=encoder",
  "head=encoder",
  "checkpoint=google-t5/t5-base",
  "lr=1e-4",
)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, tiny=False, checkpoint="", head="decoder", lr=LR)
  if arg.head not in HEADS:
    raise ValueError(f"head={arg.head!r}: expected one of {HEADS}")
  c = config_lib.base_config()
  c.experiment = "sst2_t5"
  c.model.checkpoint = arg.checkpoint or CHECKPOINT
  # Label words are a few tokens; the sentences' buckets hold them.
  data = default_data_config("sst2", target_max_length=8)
  if arg.head == "decoder":
    c.tasks.sst2 = config_lib.task("text_to_text", data)
    c.tasks.sst2.prefix = PREFIX
    c.tasks.sst2.label_words = {"negative": "negative", "positive": "positive"}
    c.model.graft_rules = ()  # The family's own: the whole model from the checkpoint.
  else:
    c.tasks.sst2 = config_lib.task("classification", data, pooling="mean", dropout=0.1)
  config_lib.finetune(c, steps=2000, best_metric="sst2/accuracy")
  c.optim.lr = arg.lr
  if arg.tiny:
    config_lib.make_tiny(c, "sst2", fixture="sst2", steps=10)
    c.tasks.sst2.data.target_max_length = 8
    c.optim.lr = 1e-3
    c.model.encoder_overrides = {}  # Assigned: make_tiny's sizes are BERT's, not T5's.
    if arg.checkpoint:  # The tiny schedule from real (or test-made) weights.
      c.model.init = "pretrained"
    else:  # A random T5 in-process: MiniLM gives the tokenizer and the vocabulary size.
      c.model.update(checkpoint=config_lib.MINILM, family="t5")
  return config_lib.lock(c)

r"""CoNLL-2003 English NER: all-MiniLM-L6-v2 with a token-classification head (IOB2 tags).

  python -m research.main --config=configs/conll03_minilm.py --workdir=runs/conll03_minilm
  python -m research.main --config=configs/conll03_minilm.py:smoke --workdir=/tmp/conll_smoke
  python -m research.main --config=configs/conll03_minilm.py:init=scratch --workdir=runs/conll_s

The tag of a word is predicted at its first sub-token; entity-level precision / recall / F1
(equal to seqeval's) with a per-type breakdown are in results.json. Variants: ``smoke``,
``tiny`` (random 2-layer encoder on the committed fixture, for tests), ``init=scratch``,
``crf`` (a linear-chain CRF layer with Viterbi decoding instead of per-token softmax).
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "smoke", "tiny", "init=scratch", "crf", "tiny,crf")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, crf=False, init="pretrained")
  c = config_lib.base_config()
  c.experiment = "conll03_minilm"
  c.model.init = arg.init
  c.tasks.conll03 = config_lib.task(
    "tagging",
    default_data_config("conll2003", max_length=128, buckets=(32, 64, 128)),
    dropout=0.1,
    crf=arg.crf,
  )
  c.train.update(
    steps=3000,
    batch_size=32,
    log_every=50,
    eval_every=500,
    checkpoint_every=500,
    best_metric="conll03/f1",
  )
  c.optim.update(lr=1e-4, warmup_fraction=0.06, weight_decay=0.01, schedule="linear")
  c.eval.batch_size = 64
  if arg.smoke:
    c.train.update(steps=20, batch_size=8, log_every=5, eval_every=20, checkpoint_every=20)
    c.tasks.conll03.data.update(max_length=64, buckets=(64,))
  if arg.tiny:
    config_lib.make_tiny(c, "conll03", fixture="conll2003", steps=10)
  return config_lib.lock(c)

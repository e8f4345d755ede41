r"""STS-B similarity: all-MiniLM-L6-v2 as a cross-encoder regressing the 0-5 score of a pair.

  python -m research.main --config=configs/stsb_minilm.py --workdir=runs/stsb_minilm
  python -m research.main --config=configs/stsb_minilm.py:smoke --workdir=/tmp/stsb_smoke
  python -m research.main --config=configs/stsb_minilm.py:init=scratch --workdir=runs/stsb_scratch
  python -m research.main --mode=predict --workdir=runs/stsb_minilm --input=pairs.tsv

Both sentences go through the encoder together (``[CLS] a [SEP] b [SEP]``, bucketed on the joint
length); the head mean-pools and predicts the score with a squared-error loss (kind
``regression``). all-MiniLM-L6-v2 was trained on sentence similarity, so three epochs suffice.
Predict mode reads one tab-separated pair per line and writes ``value``.

Variants (comma-separated): ``smoke`` (a few steps, under a minute on 2 CPU cores), ``tiny``
(a 2-layer random encoder on the committed fixture, seconds; for tests), ``init=scratch``.
Reached (2-core CPU shared with other runs, fp32, 540 steps x 32, 35 min): STS-B dev Pearson
87.14, Spearman 86.81 (83.45 / 86.92 after epochs 1 / 2); see docs/results.md.
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "smoke", "tiny", "init=scratch", "smoke,init=scratch")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, init="pretrained")
  c = config_lib.base_config()
  c.experiment = "stsb_minilm"
  c.model.init = arg.init
  c.tasks.stsb = config_lib.task(
    "regression", default_data_config("stsb"), pooling="mean", dropout=0.1
  )
  # 5,749 pairs: 3 epochs of 179 batches of 32; evaluate once per epoch.
  config_lib.finetune(c, steps=540, best_metric="stsb/pearson", every=180)
  if arg.smoke:
    config_lib.smoke(c)
    data = c.tasks.stsb.data
    data.update(max_length=64, buckets=(32, 64))  # Two shapes: fewer compiles.
    data.splits.eval = "validation[:256]"
  if arg.tiny:
    config_lib.make_tiny(c, "stsb", fixture="stsb", steps=20)
  return config_lib.lock(c)

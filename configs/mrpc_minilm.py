r"""MRPC paraphrase detection: all-MiniLM-L6-v2 with a 2-label head on sentence pairs.

  python -m research.main --config=configs/mrpc_minilm.py --workdir=runs/mrpc_minilm
  python -m research.main --config=configs/mrpc_minilm.py:smoke --workdir=/tmp/mrpc_smoke
  python -m research.main --config=configs/mrpc_minilm.py:init=scratch --workdir=runs/mrpc_scratch
  python -m research.main --mode=predict --workdir=runs/mrpc_minilm --input=pairs.tsv

Both sentences go through the encoder together (``[CLS] a [SEP] b [SEP]``, bucketed on the joint
length); the head mean-pools (kind ``classification``). Metrics: accuracy, macro-F1 and, as GLUE
reports for MRPC, ``f1_paraphrase``, the F1 of the positive class (the best-checkpoint metric).
Predict mode reads one tab-separated pair per line and writes ``label`` and ``probs``.

Variants (comma-separated): ``smoke`` (a few steps, under a minute on 2 CPU cores), ``tiny``
(a 2-layer random encoder on the committed fixture, seconds; for tests), ``init=scratch``.
Reached (2-core CPU, fp32, 456 steps x 32, 12.8 min): MRPC dev F1 (paraphrase) 86.59, accuracy
80.64; short of the 88 F1 goal (lr 5e-5 did worse, 85.35 at step 456); see docs/results.md.
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "smoke", "tiny", "init=scratch", "smoke,init=scratch")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, init="pretrained")
  c = config_lib.base_config()
  c.experiment = "mrpc_minilm"
  c.model.init = arg.init
  c.tasks.mrpc = config_lib.task(
    "classification", default_data_config("mrpc"), pooling="mean", dropout=0.1
  )
  # 3,668 pairs: 4 epochs of 114 batches of 32; evaluate once per epoch.
  config_lib.finetune(c, steps=456, best_metric="mrpc/f1_paraphrase", every=114)
  if arg.smoke:
    config_lib.smoke(c)
    c.tasks.mrpc.data.update(max_length=64, buckets=(32, 64))  # Two shapes: fewer compiles.
  if arg.tiny:
    config_lib.make_tiny(c, "mrpc", fixture="mrpc", steps=20)
  return config_lib.lock(c)

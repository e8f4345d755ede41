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

VARIANTS = ("", "smoke", "tiny", "init=scratch", "smoke,init=scratch")


def get_config(arg: str | None = None):
  # 5,749 pairs: 3 epochs of 180 steps of 32, one evaluation per epoch.
  return config_lib.pair_experiment(
    arg, "stsb_minilm", "regression", "stsb", epochs=3, batches_per_epoch=180, best_metric="pearson"
  )

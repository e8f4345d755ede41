r"""Multi30k en->de: a pretrained T5 (v1.0, v1.1, mT5 or UMT5) fine-tuned whole.

  python -m research.main --config=configs/multi30k_t5.py --workdir=runs/m30k_t5
  python -m research.main --config=configs/multi30k_t5.py:checkpoint=google/mt5-small \
    --workdir=runs/m30k_mt5
  python -m research.main --config=configs/multi30k_t5.py:tiny --workdir=/tmp/m30k_t5_tiny
  python -m research.main --mode=predict --workdir=runs/m30k_t5 --input=sentences.en.txt

The protocol of the translation comparison (``research.config_lib.translation_experiment``:
4,000 steps of 128 pairs, label smoothing 0.1, AdamW with the inverse-square-root schedule,
beam-4 and greedy decoding scored with cased sacreBLEU and chrF) over the checkpoint's own
model and SentencePiece tokenizer on both sides: targets end with ``</s>``, decoding starts
from ``decoder_start_token_id`` (pad). The one flag that points at other weights is
``checkpoint=`` (an HF directory or hub id of model type t5, mt5 or umt5; downloaded into the
huggingface_hub cache on first use). t5-small saw WMT en-de during pre-training; mT5 did not.

Variants (comma-separated): ``tiny`` (a random 2-layer T5 of width 32 on MiniLM's tokenizer and
the committed fixture; seconds, for tests), ``smoke`` (10 steps on the real data, 64 val
sentences decoded greedily: the same random model without ``checkpoint=``, the real one with
it), ``checkpoint=ID``, ``lr=X``, ``seed=N``, ``steps=N``.
Reached: not run here (no T5 weights install offline on the project's machine).
"""

from research import config_lib

CHECKPOINT = "google-t5/t5-small"
LR = 3e-4  # AdamW's usual peak for fine-tuning t5-small; the protocol's rsqrt decay after it.

VARIANTS = ("", "tiny", "smoke", "checkpoint=google/mt5-small", "lr=1e-4")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, checkpoint="", lr=LR, seed=0, steps=0)
  c = config_lib.pretrained_translation(arg, "multi30k_t5", "t5", CHECKPOINT)
  return config_lib.lock(c)

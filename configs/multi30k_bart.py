r"""Multi30k en->de: a pretrained BART (or mBART) fine-tuned whole.

  python -m research.main --config=configs/multi30k_bart.py --workdir=runs/m30k_bart
  python -m research.main --config=configs/multi30k_bart.py:tiny --workdir=/tmp/m30k_bart_tiny
  python -m research.main --mode=predict --workdir=runs/m30k_bart --input=sentences.en.txt

The protocol of the translation comparison (``research.config_lib.translation_experiment``)
over the checkpoint's own model and byte-level BPE on both sides (it writes German, though BART
was pre-trained on English only): targets are ``<s> ... </s>``, decoding starts from
``decoder_start_token_id`` (``</s>``). The one flag that points at other weights is
``checkpoint=`` (an HF directory or hub id of model type bart or mbart). mBART's language codes
(``src_lang``/``tgt_lang`` and the forced target-language token) are not set by this config:
for mBART give the tokenizer its languages before fine-tuning.

Variants (comma-separated): ``tiny`` (a random 2-layer BART of width 32 on MiniLM's tokenizer
and the committed fixture; seconds, for tests), ``smoke`` (10 steps on the real data: the same
random model without ``checkpoint=``, the real one with it), ``checkpoint=ID``, ``lr=X``,
``seed=N``, ``steps=N``.
Reached: not run here (no BART weights install offline on the project's machine).
"""

from research import config_lib

CHECKPOINT = "facebook/bart-base"
LR = 5e-5  # The usual peak for fine-tuning BART; the protocol's rsqrt decay after it.

VARIANTS = ("", "tiny", "smoke", "lr=1e-4")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, checkpoint="", lr=LR, seed=0, steps=0)
  c = config_lib.pretrained_translation(arg, "multi30k_bart", "bart", CHECKPOINT)
  return config_lib.lock(c)

r"""Multi30k en->de: a pretrained Marian (Opus-MT) translation model fine-tuned whole.

  python -m research.main --config=configs/multi30k_marian.py --workdir=runs/m30k_marian
  python -m research.main --config=configs/multi30k_marian.py:tiny --workdir=/tmp/m30k_mar_tiny
  python -m research.main --mode=predict --workdir=runs/m30k_marian --input=sentences.en.txt

The protocol of the translation comparison (``research.config_lib.translation_experiment``)
over Helsinki-NLP/opus-mt-en-de, already an English->German model: its SentencePiece source
and target tokenizers (``source.spm`` / ``target.spm``, through transformers' MarianTokenizer,
which needs the ``sentencepiece`` package), targets ending with ``</s>``, decoding from
``decoder_start_token_id`` (pad). The one flag that points at other weights is ``checkpoint=``
(an HF directory or hub id of model type marian).

Variants (comma-separated): ``tiny`` (a random 2-layer Marian of width 32 on MiniLM's tokenizer
and the committed fixture; seconds, for tests), ``smoke`` (10 steps on the real data: the same
random model without ``checkpoint=``, the real one with it), ``checkpoint=ID``, ``lr=X``,
``seed=N``, ``steps=N``.
Reached: not run here (no Opus-MT weights install offline on the project's machine).
"""

from research import config_lib

CHECKPOINT = "Helsinki-NLP/opus-mt-en-de"
LR = 2e-5  # A model already trained for the task: a gentle peak; the protocol's rsqrt decay.

VARIANTS = ("", "tiny", "smoke", "lr=5e-5")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, checkpoint="", lr=LR, seed=0, steps=0)
  c = config_lib.pretrained_translation(arg, "multi30k_marian", "marian", CHECKPOINT)
  return config_lib.lock(c)

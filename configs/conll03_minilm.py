r"""CoNLL-2003 English NER: all-MiniLM-L6-v2 with a token-classification head (IOB2 tags).

  python -m research.main --config=configs/conll03_minilm.py --workdir=runs/conll03_minilm
  python -m research.main --config=configs/conll03_minilm.py:crf --workdir=runs/conll03_crf
  python -m research.main --config=configs/conll03_minilm.py:smoke --workdir=/tmp/conll_smoke
  python -m research.main --config=configs/conll03_minilm.py:init=scratch --workdir=runs/conll_s

The tag of a word is predicted at its first sub-token; entity-level precision / recall / F1
(equal to seqeval's) with a per-type breakdown are in results.json. 1500 steps x 32 sentences
(3.4 epochs), linear decay from 1e-4. Variants: ``smoke`` (20 steps, 256 dev sentences),
``tiny`` (random 2-layer encoder on the committed fixture, for tests), ``init=scratch``,
``crf`` (a linear-chain CRF layer with Viterbi decoding instead of per-token softmax).
Measured (1500 steps, 2-core CPU): dev entity F1 90.56 (softmax), 90.62 (crf); see docs/results.md.
"""

from research import config_lib

VARIANTS = ("", "smoke", "tiny", "init=scratch", "crf", "tiny,crf")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, crf=False, init="pretrained")
  c = config_lib.ner_experiment(arg, "conll03_minilm", "conll03", "conll2003")
  return config_lib.lock(c)

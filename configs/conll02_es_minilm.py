r"""CoNLL-2002 Spanish NER: the CoNLL-2003 recipe on a second language (train 8,323 / testa).

  python -m research.main --config=configs/conll02_es_minilm.py --workdir=runs/conll02_es
  python -m research.main --config=configs/conll02_es_minilm.py:smoke --workdir=/tmp/es_smoke
  python -m research.main --config=configs/conll02_es_minilm.py \
      --config.model.checkpoint=/path/to/xlm-roberta-base --workdir=runs/conll02_es_xlmr

The default checkpoint is all-MiniLM-L6-v2, whose vocabulary is English and uncased (accents
stripped): it runs anywhere offline, but a multilingual encoder (XLM-R, multilingual MiniLM; any
HF directory via ``model.checkpoint``) is the natural choice for Spanish. Evaluated on ``testa``
(the ``dev`` split). Variants: ``smoke``, ``tiny`` (committed fixture), ``init=scratch``, ``crf``.
"""

from research import config_lib

VARIANTS = ("", "smoke", "tiny", "init=scratch", "crf")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, crf=False, init="pretrained")
  c = config_lib.ner_experiment(arg, "conll02_es_minilm", "conll02_es", "conll2002_es")
  return config_lib.lock(c)

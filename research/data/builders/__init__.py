"""Our tfds builders for local files, one per format; importing this package registers them.

- ``local_text_classification``: TSV / CSV with text and label columns (SST-2, AG News, UCI).
- ``local_conll``: CoNLL column files for NER, IOB1 / IOB2 / BIOES (CoNLL-2003, CoNLL-2002).
- ``local_parallel_text``: one line-aligned file per language, plain or .gz (Multi30k).
- ``local_intents``: intent JSON Lines / CLINC150 JSON with few-shot class splits.
- ``local_sentence_pairs``: TSV sentence pairs with a class label or a float score (MRPC, STS-B).
"""

from research.data.builders.conll import LocalConll
from research.data.builders.intents import LocalIntents
from research.data.builders.parallel_text import LocalParallelText
from research.data.builders.sentence_pairs import LocalSentencePairs
from research.data.builders.text_classification import LocalTextClassification

# tfds builder name -> class, for data_cfg.tfds_name = "<name>/<config>".
BUILDERS = {
  cls.name: cls
  for cls in (
    LocalTextClassification,
    LocalConll,
    LocalParallelText,
    LocalIntents,
    LocalSentencePairs,
  )
}

__all__ = [
  "BUILDERS",
  "LocalConll",
  "LocalIntents",
  "LocalParallelText",
  "LocalSentencePairs",
  "LocalTextClassification",
]

"""Pretrained encoder-decoder models (T5, mT5, UMT5; BART-like families beside them) as families.

``core`` holds what they share: the attention arithmetic with additive masks, the decoding cache
layout and transformers-compatible greedy and beam search over it. Each family module (``t5``)
holds its modules, config and :class:`~research.models.family.Family` record, whose ``seq2seq``
field is the whole encoder-decoder; research.models.families registers them.
"""

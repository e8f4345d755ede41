"""Seq2seq text at both ends: which vocabularies encode sources and targets, and how decoded
hypotheses are scored (detokenised, cased sacreBLEU and chrF on the original references).

**Vocabularies** (``config.tasks.<name>.vocab``; absent = the checkpoint's tokenizer on both
sides, as before, which for all-MiniLM-L6-v2 means lowercased German without umlauts):

- ``target``: ``'pretrained'`` (the checkpoint's tokenizer) or ``'bpe'``: a cased byte-level
  BPE trained on the training split (research.data.subword). The decoder's vocabulary, tied
  output layer and LM head are this one; its size is the decoder's ``vocab_size``.
- ``source``: ``'pretrained'`` (the encoder's own tokenizer: BERT2RND keeps what MiniLM was
  trained with) or ``'joint'`` (the trained BPE on both sides, learnt from the source and target
  training text; for encoders trained from scratch).
- ``size``, ``min_frequency``: the BPE's settings.

The seq2seq tasks of a run share one decoder, so they must share these settings. A trained
vocabulary is kept in the run directory as :data:`TARGET_FILE`; a resumed run and predict mode
read that copy, never the cache, so they use exactly the vocabulary the run trained with.

**Metrics** (:func:`scores`): ``sacrebleu.metrics.BLEU`` (13a tokenisation, cased) and ``CHRF``
on detokenised hypotheses against the eval split's target text as the data files hold it, never
re-tokenised (a reference run through an uncased tokenizer would score the tokenizer's
normalisation instead of the translation). Each score is stored with sacreBLEU's signature
string, which says how it was computed (``nrefs:1|case:mixed|eff:no|tok:13a|...``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from research.data import sources, subword, tokenize

TARGET_FILE = "target_tokenizer.json"
VOCAB_DEFAULTS = dict(target="pretrained", source="pretrained", size=8000, min_frequency=2)
TARGETS = ("pretrained", "bpe")
SOURCES = ("pretrained", "joint")


def vocab_settings(task_cfg: Any) -> dict[str, Any]:
  """``task_cfg.vocab`` over :data:`VOCAB_DEFAULTS`.

  Raises:
    ValueError: an unknown field or value.
  """
  given = dict(task_cfg.get("vocab", {}) or {})
  unknown = sorted(set(given) - set(VOCAB_DEFAULTS))
  if unknown:
    raise ValueError(f"vocab: unknown field(s) {unknown}; fields: {sorted(VOCAB_DEFAULTS)}")
  out = {**VOCAB_DEFAULTS, **given}
  if out["target"] not in TARGETS:
    raise ValueError(f"vocab.target={out['target']!r}: expected one of {TARGETS}")
  if out["source"] not in SOURCES:
    raise ValueError(f"vocab.source={out['source']!r}: expected one of {SOURCES}")
  if out["source"] == "joint" and out["target"] == "pretrained":
    raise ValueError("vocab.source='joint' needs a trained target vocabulary (vocab.target='bpe')")
  if out["target"] == "bpe" and out["size"] < subword.MIN_SIZE:
    raise ValueError(f"vocab.size={out['size']}: at least {subword.MIN_SIZE} for byte-level BPE")
  return out


def shared_vocab(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The vocabulary settings of the run's seq2seq tasks (one decoder: they must agree)."""
  found = {name: vocab_settings(t) for name, t in config.tasks.items() if t.kind == "seq2seq"}
  distinct = {tuple(sorted(v.items())) for v in found.values()}
  if len(distinct) > 1:
    raise ValueError(f"seq2seq tasks share one decoder, so one vocab; they differ: {found}")
  return next(iter(found.values()))


@dataclasses.dataclass(eq=False)
class Tokenizers:
  """The source and target tokenizers of a seq2seq task, passed where one tokenizer goes.

  The data pipeline keys its cache of tokenized splits by ``research.data.tokenize.
  tokenizer_fingerprint``; the members below are what it reads, so the key covers both
  vocabularies, and ``bos/eos/pad`` are the decoder's.

  Attributes:
    source: encodes sources.
    target: encodes targets and detokenises hypotheses.
    target_json: the trained target vocabulary's ``tokenizer.json`` text (None: the
      pretrained tokenizer); what the run directory keeps.
  """

  source: Any
  target: Any
  target_json: str | None = None
  decoder_start: int | None = None

  def specials(self) -> dict[str, int]:
    """The decoder's ``pad``, ``bos`` (start) and ``eos`` ids.

    A pretrained encoder-decoder starts decoding with its config's ``decoder_start_token_id``
    (T5 and Marian: pad; BART: eos) and its targets keep the tokenizer's own special tokens;
    otherwise the target tokenizer's bos/eos (or cls/sep) frame the target.
    """
    if self.decoder_start is None:
      return tokenize.special_ids(self.target)
    pad, eos = self.target.pad_token_id, self.target.eos_token_id
    eos = self.target.sep_token_id if eos is None else eos
    if pad is None or eos is None:
      raise ValueError(f"Tokenizer {self.target.name_or_path!r} lacks an eos/sep or pad token.")
    return {"pad": int(pad), "bos": int(self.decoder_start), "eos": int(eos)}

  @property
  def name_or_path(self) -> str:
    return f"{self.source.name_or_path} -> {self.target.name_or_path or 'trained'}"

  def __len__(self) -> int:
    return len(self.target)

  def get_vocab(self) -> dict[str, str]:
    return {
      "source": tokenize.tokenizer_fingerprint(self.source),
      "target": tokenize.tokenizer_fingerprint(self.target),
      "decoder_start": str(self.decoder_start),
    }

  @property
  def source_pad(self) -> int:
    """The source tokenizer's padding id (all a source needs: no start or end token of ours)."""
    if self.source.pad_token_id is None:
      raise ValueError(f"Tokenizer {self.source.name_or_path!r} lacks a pad token.")
    return int(self.source.pad_token_id)

  @property
  def bos_token_id(self) -> int:
    return self.specials()["bos"]

  @property
  def eos_token_id(self) -> int:
    return self.specials()["eos"]

  @property
  def pad_token_id(self) -> int:
    return self.specials()["pad"]

  def decode(self, ids: Sequence[int]) -> str:
    """The detokenised text of target ``ids`` (special tokens and ids beyond the vocabulary
    dropped: the decoder's embedding table may be larger than a small corpus' vocabulary).

    A trained BPE decodes exactly; the clean-up of spaces before punctuation is only for
    WordPiece, where it undoes the tokenizer's own splitting.
    """
    n = len(self.target)
    return self.target.decode(
      [int(i) for i in ids if 0 <= int(i) < n],
      skip_special_tokens=True,
      clean_up_tokenization_spaces=self.target_json is None,
    )


def decoder_start(model_cfg: Any) -> int | None:
  """The ``decoder_start_token_id`` of a pretrained encoder-decoder checkpoint (T5, BART,
  Marian), None for any other family (whose decoder the run adds: the tokenizer frames it)."""
  from research.models import families
  from research.transfer import hf

  cfg = hf.load_config(hf.resolve(model_cfg.checkpoint), model_cfg.get("family") or None)
  if families.family_of(cfg).seq2seq is None:
    return None
  return int(cfg.decoder_start_token_id)


def as_tokenizers(tokenizer: Any) -> Tokenizers:
  """``tokenizer`` itself, or one pretrained tokenizer on both sides."""
  return tokenizer if isinstance(tokenizer, Tokenizers) else Tokenizers(tokenizer, tokenizer)


def load_tokenizers(
  config: ml_collections.ConfigDict,
  task: str,
  pretrained: Any,
  workdir: str | Path | None = None,
  build: bool = True,
) -> Tokenizers:
  """The tokenizers of ``task`` (see the module docstring).

  Args:
    config: the run's config.
    task: a seq2seq task of it.
    pretrained: the checkpoint's tokenizer.
    workdir: the run directory; its :data:`TARGET_FILE`, when present, is the vocabulary.
    build: train (or take from the cache) a vocabulary the run directory lacks; predict mode
      passes False and gets an error instead.

  Raises:
    FileNotFoundError: ``build=False`` and the run directory holds no trained vocabulary.
    ValueError: the vocabulary holds more tokens than the decoder's ``vocab.size``.
  """
  settings = vocab_settings(config.tasks[task])
  if settings["target"] == "pretrained":
    return Tokenizers(pretrained, pretrained, decoder_start=decoder_start(config.model))
  path = Path(workdir) / TARGET_FILE if workdir is not None else None
  if path is not None and path.is_file():
    text = path.read_text(encoding="utf-8")
  elif not build:
    raise FileNotFoundError(
      f"{path or TARGET_FILE}: the run's trained target vocabulary is missing; it is written "
      "at the start of training, and predict mode reads only that copy"
    )
  else:
    parts = []
    for t in config.tasks.values():
      if t.kind == "seq2seq":
        cols = [t.data.target_key]
        if settings["source"] == "joint":
          cols = [t.data.source_key, *cols]
        parts.append((t.data, cols))
    text = subword.trained(parts, settings["size"], settings["min_frequency"])
  target = subword.from_json(text)
  if len(target) > settings["size"]:
    raise ValueError(
      f"{path or 'the trained vocabulary'} holds {len(target)} tokens, more than vocab.size="
      f"{settings['size']} (the decoder's vocabulary)"
    )
  source = target if settings["source"] == "joint" else pretrained
  return Tokenizers(source, target, text)


def reference_texts(data_cfg: ml_collections.ConfigDict) -> list[str]:
  """The eval split's target sentences as the data files hold them (cased, untokenised)."""
  builder = sources.get_builder(data_cfg)
  split = data_cfg.splits.eval
  return list(sources.read_columns(builder, split, [data_cfg.target_key])[data_cfg.target_key])


def bleu(hypotheses: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus BLEU, cased, 13a tokenisation (sacreBLEU's defaults, spelled out)."""
  from sacrebleu.metrics import BLEU

  return float(BLEU(tokenize="13a").corpus_score(list(hypotheses), [list(refs)]).score)


def chrf(hypotheses: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus chrF (character 6-grams, beta 2: sacreBLEU's defaults)."""
  from sacrebleu.metrics import CHRF

  return float(CHRF().corpus_score(list(hypotheses), [list(refs)]).score)


def scores(hypotheses: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
  """``bleu``, ``bleu_signature``, ``chrf``, ``chrf_signature`` and ``length_ratio``
  (hypothesis / reference length in 13a tokens, the ratio BLEU's brevity penalty reads).

  Raises:
    ValueError: different numbers of hypotheses and references.
  """
  from sacrebleu.metrics import BLEU, CHRF

  if len(hypotheses) != len(refs):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(refs)} references")
  hyps, refs_ = list(hypotheses), [list(refs)]
  b, c = BLEU(tokenize="13a"), CHRF()
  bs, cs = b.corpus_score(hyps, refs_), c.corpus_score(hyps, refs_)
  return {
    "bleu": float(bs.score),
    "bleu_signature": str(b.get_signature()),
    "chrf": float(cs.score),
    "chrf_signature": str(c.get_signature()),
    "length_ratio": float(bs.sys_len / bs.ref_len) if bs.ref_len else 0.0,
  }

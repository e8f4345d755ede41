"""The task-kind interface: everything that differs between kinds, behind one object per kind.

A *task kind* (``config.tasks.<name>.kind``) decides how a data set is read and tokenized, which
head the model gets, the loss, the predictions, the metrics, and how predict mode parses a line
and renders a prediction. The trainer, the model builder, the steps and predict mode reach a kind
only through :func:`research.tasks.get`, so a new kind is one module with a
:func:`research.tasks.register_kind` class; nothing else changes (docs/extending.md).

:class:`TaskKind` is the interface with the defaults most kinds keep; :class:`TextKind` adds the
data and predict-mode halves of kinds that label whole texts or text pairs (classification,
regression, and kinds written outside the package).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from research.data import input_pipeline, tokenize
from research.models.heads import HeadConfig, HeadSpec

Batch = dict[str, Any]


class LineError(ValueError):
  """A predict-mode input line the kind cannot read; the line gets ``{"error": message}``."""


class TaskKind:
  """One task kind. Subclass, override what differs, and register with ``@register_kind(name)``.

  Attributes:
    name: the registered name (set by ``register_kind``).
    metric_names: the headline metrics (informative).
    encoder: how a split of the data set becomes token arrays (the data layer's
      :class:`~research.data.tokenize.SplitEncoder`; e.g. tagging's first-sub-token alignment).
  """

  name: str = ""
  metric_names: ClassVar[tuple[str, ...]] = ()
  encoder: tokenize.SplitEncoder = tokenize.TextEncoder()

  # ---------------------------------------------------------------- data

  def label_names(self, data_cfg: ml_collections.ConfigDict) -> list[str]:
    """Label names of the data set as this kind reads it (``[]`` when labels are not names)."""
    return input_pipeline.label_names(data_cfg, self.encoder)

  def tokenizer(
    self,
    config: ml_collections.ConfigDict,
    task: str,
    pretrained: Any,
    workdir: str | Path | None = None,
    build: bool = True,
  ) -> Any:
    """The tokenizer that task ``task``'s data, evaluation and predict mode go through.

    Default: ``pretrained``, the checkpoint's. A kind with a vocabulary of its own returns an
    object its own functions read (seq2seq: a cased target vocabulary trained on the data). It
    reads back its copy in ``workdir`` (the run directory, see :meth:`run_files`) when there is
    one, so a resumed run and predict mode use exactly the vocabulary the run trained with;
    ``build=False`` (predict mode) forbids making a missing one.
    """
    del config, task, workdir, build
    return pretrained

  def run_files(self, tokenizer: Any) -> dict[str, str]:
    """``{file name: text}`` the run directory keeps for :meth:`tokenizer` (default none)."""
    del tokenizer
    return {}

  # ---------------------------------------------------------------- model

  def head(self, task_cfg: ml_collections.ConfigDict, num_labels: int) -> HeadSpec:
    """The task's head in a TaskModel; ``num_labels`` = ``len(label_names)``."""
    raise NotImplementedError(f"task kind {self.name!r} defines no head")

  def build_model(self, config: ml_collections.ConfigDict, encoder: Any, **model_kw: Any) -> Any:
    """A whole model for kinds that are not an encoder with heads (seq2seq), else None.

    Args:
      config: the run's config (every task of the run has this kind).
      encoder: the encoder architecture.
      **model_kw: ``dtype``, ``param_dtype``, ``remat``.
    """
    del config, encoder, model_kw
    return None

  # ---------------------------------------------------------------- training and evaluation

  def loss(self, outputs: Any, batch: Batch, **options: Any) -> tuple[jax.Array, jax.Array]:
    """``(summed loss, summed weight)``, jit-traceable; rows weighted by ``example_mask``.

    The step divides the sums, so gradient accumulation and device sums are exact. ``options``
    are ``config.tasks.<name>.loss`` in training; evaluation passes none.
    """
    raise NotImplementedError

  def predict(self, outputs: Any, batch: Batch | None = None) -> dict[str, jax.Array]:
    """Per-example (or per-token) predictions, jit-traceable (runs in the eval step)."""
    raise NotImplementedError

  def metrics(
    self,
    predictions: dict[str, np.ndarray],
    gold: dict[str, np.ndarray],
    label_names: Sequence[str] | None = None,
  ) -> dict[str, Any]:
    """Host-side metrics over a whole eval split (``gold``: ``labels``, ``example_mask``).

    Nested dicts are flattened with "/" in metrics.jsonl; include ``examples``.
    """
    raise NotImplementedError

  def make_evaluate(self, model: Any, task: str, task_cfg: Any, tokenizer: Any) -> Any:
    """Optional evaluation beyond the eval step (seq2seq: decode, then BLEU), or None.

    Returns:
      ``evaluate(params, eval batches, put) -> dict`` merged into the eval metrics.
    """
    del model, task, task_cfg, tokenizer
    return None

  # ---------------------------------------------------------------- predict mode

  def parse_line(self, text: str, data_cfg: ml_collections.ConfigDict) -> Any:
    """One non-empty input line as the kind's input; raises :class:`LineError` when unusable."""
    del data_cfg
    return text

  def encode_inputs(
    self, tokenizer: Any, inputs: Sequence[Any], data_cfg: ml_collections.ConfigDict
  ) -> tuple[tokenize.Tokenized, int]:
    """``(tokenized inputs with dummy labels, number truncated to max_length)``."""
    raise NotImplementedError(f"task kind {self.name!r} has no predict mode")

  def render(
    self, out: dict[str, np.ndarray], row: int, batch: Batch, labels: list[str], inputs: Any
  ) -> dict[str, Any]:
    """The JSON record of row ``row`` of a predict batch (``out``: :meth:`predict`'s arrays)."""
    raise NotImplementedError(f"task kind {self.name!r} has no predict mode")

  def predict_lines(
    self,
    model: Any,
    params: Any,
    task: str,
    task_cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    inputs: Sequence[Any],
    batch_size: int,
  ) -> tuple[list[dict[str, Any]], int] | None:
    """A kind's own predict loop (seq2seq decodes); None = the generic one (predict mode runs
    :meth:`encode_inputs`, the jitted :meth:`predict` and :meth:`render`).

    Returns:
      ``(one record per input, number truncated)`` or None.
    """
    del model, params, task, task_cfg, tokenizer, inputs, batch_size
    return None


class TextKind(TaskKind):
  """A kind that labels whole texts or text pairs (``data_cfg.text_pair_key`` set).

  Data: :class:`~research.data.tokenize.TextEncoder` (pairs use the tokenizer's pair encoding and
  are bucketed on their joint length). Head: the stock pooled :class:`HeadConfig` with
  ``layout`` ('sequence' or 'scalar') and ``config.tasks.<name>.head`` options. Predict mode: a
  line is one text, or for pair data sets two texts separated by a tab.
  """

  layout: ClassVar[str] = "sequence"

  def head(self, task_cfg: ml_collections.ConfigDict, num_labels: int) -> HeadSpec:
    options = dict(task_cfg.get("head", {}) or {})
    width = 1 if self.layout == "scalar" else num_labels
    return HeadConfig(layout=self.layout, num_labels=width, **options)

  def parse_line(self, text: str, data_cfg: ml_collections.ConfigDict) -> Any:
    if not data_cfg.text_pair_key:
      return text
    parts = text.split("\t")
    if len(parts) != 2 or not all(p.strip() for p in parts):
      raise LineError(
        f"expected a sentence pair: two non-empty texts separated by one tab, found {len(parts)} "
        f"field(s)"
      )
    return tuple(parts)

  def encode_inputs(
    self, tokenizer: Any, inputs: Sequence[Any], data_cfg: ml_collections.ConfigDict
  ) -> tuple[tokenize.Tokenized, int]:
    pair = bool(data_cfg.text_pair_key)
    first = [x[0] if pair else x for x in inputs]
    second = [x[1] for x in inputs] if pair else None
    tok = tokenize.texts(tokenizer, first, data_cfg.max_length, second)
    full = tokenize.texts(tokenizer, first, 10**6, second) if inputs else None
    truncated = int(np.sum(full.lengths > data_cfg.max_length)) if full is not None else 0
    return tok, truncated

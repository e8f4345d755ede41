"""One module per task kind: its loss, its metrics and how predictions are decoded.

Each task module exposes ``loss(logits, batch) -> (sum, weight)`` (jit-traceable; the trainer
divides the summed loss by the summed weight so gradient accumulation is exact),
``predict(outputs, batch) -> dict of arrays`` (jit-traceable) and
``metrics(predictions, gold, label_names=None) -> dict`` (host side, over a whole eval split).
A module may also expose ``make_evaluate(model, task, task_cfg, tokenizer)``, returning
``evaluate(params, eval batches, put) -> dict`` whose metrics the Evaluator adds (seq2seq:
decoding and BLEU).
"""

from __future__ import annotations

from types import ModuleType


def get(kind: str) -> ModuleType:
  """The task module for a head kind ('classification', 'tagging', 'regression', ...)."""
  from research.tasks import classification, regression, seq2seq, tagging

  modules = {
    "classification": classification,
    "regression": regression,
    "tagging": tagging,
    "seq2seq": seq2seq,
  }
  if kind not in modules:
    raise ValueError(f"unknown task kind {kind!r}; known: {sorted(modules)}")
  return modules[kind]

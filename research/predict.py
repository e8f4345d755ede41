"""Predictions from a trained run: one input per line in, one JSON object per line out.

  python -m research.main --mode=predict --workdir=runs/sst2_minilm --input=reviews.txt \
      [--output=preds.jsonl] [--task=sst2]

Uses the run's ``config.json``, ``labels.json`` and its best params (``best/``, else the
latest checkpoint). Classification lines get ``label`` and ``probs``; tagging lines are split
on whitespace into words and get per-word ``tags`` and entity ``spans``. Bad lines never cost
the others their output: an empty line gets ``"error": "empty line"``, bytes that are not UTF-8
are replaced (with a warning naming the line), and lines longer than the model's maximum are
truncated, with one warning that counts them. Seq2seq runs translate each line (decoding
settings from the run's config) and write ``translation``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from research import tasks as task_lib
from research.data import batching, tokenize
from research.tasks import tagging
from research.train import checkpoints as ckpt_lib
from research.train.state import build_model
from research.train.steps import apply_model


def read_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
  """``(line number, text, problem)`` for each line; undecodable bytes are replaced."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      raw = raw.rstrip(b"\r\n")
      try:
        text, problem = raw.decode("utf-8"), None
      except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        problem = f"not UTF-8 at byte {e.start} (0x{raw[e.start]:02x}); replaced"
        logging.warning("%s:%d: %s", path, number, problem)
      yield number, text, problem


def load_run(workdir: Path, task: str | None) -> tuple[Any, str, dict[str, list[str]], Any]:
  """``(config, task, label names of every task, params)`` of a finished or running run.

  A multi-task run needs ``task`` (its model still gets every head, as in training).
  """
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  names = list(config.tasks)
  if task is None and len(names) > 1:
    raise ValueError(f"{workdir} is a multi-task run: choose --task from {names}")
  task = task or names[0]
  if task not in names:
    raise ValueError(f"{workdir}: no task {task!r}; choose --task from {names}")
  labels_file = workdir / "labels.json"
  if labels_file.is_file():
    labels = json.loads(labels_file.read_text())
  else:
    from research.data import input_pipeline

    labels = {t: input_pipeline.label_names(config.tasks[t].data) for t in names}
  params, _ = ckpt_lib.load_params(workdir, prefer="best")
  return config, task, labels, params


def predict_file(
  workdir: str | Path,
  input_path: str | Path,
  output_path: str | Path | None = None,
  *,
  task: str | None = None,
  batch_size: int = 64,
) -> Path:
  """Writes predictions for every line of ``input_path``; returns the output path."""
  import transformers

  from research.transfer import hf

  workdir, input_path = Path(workdir), Path(input_path)
  output_path = Path(output_path or workdir / "predictions" / f"{input_path.stem}.jsonl")
  output_path.parent.mkdir(parents=True, exist_ok=True)
  config, task, all_labels, params = load_run(workdir, task)
  model, _ = build_model(config, {t: len(names) for t, names in all_labels.items()})
  task_cfg, labels = config.tasks[task], all_labels[task]
  module = task_lib.get(task_cfg.kind)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf.resolve(config.model.checkpoint)))
  lines = list(read_lines(input_path))
  keep = [i for i, (_, text, _) in enumerate(lines) if text.strip()]
  max_length = task_cfg.data.max_length
  results: dict[int, dict] = {}
  tok = None
  if task_cfg.kind == "seq2seq":  # Translation with the run's decode settings.
    from research.tasks import seq2seq

    texts = [lines[i][1] for i in keep]
    out, truncated = seq2seq.translate_lines(
      model, params, task, task_cfg, tokenizer, texts, batch_size
    )
    results = {keep[j]: {"translation": t} for j, t in enumerate(out)}
  elif task_cfg.kind == "tagging":
    words = [lines[i][1].split() for i in keep]
    tok = tokenize.tagging(tokenizer, words, [[0] * len(w) for w in words], max_length)
    truncated = tok.stats["truncated"]
  else:
    texts = [lines[i][1] for i in keep]
    tok = tokenize.classification(tokenizer, texts, [0] * len(texts), max_length)
    full = tokenize.classification(tokenizer, texts, [0] * len(texts), 10**6) if texts else None
    truncated = int(np.sum(full.lengths > max_length)) if full is not None else 0
  if truncated:
    logging.warning(
      "%s: %d line(s) longer than max_length=%d tokens were truncated",
      input_path,
      truncated,
      max_length,
    )
  step = jax.jit(lambda p, b: module.predict(apply_model(model, p, b, task), b))
  buckets = tuple(task_cfg.data.buckets)
  for rows in batching.eval_plan(len(keep), batch_size) if keep and tok is not None else []:
    batch = batching.assemble(tok, rows, fill=0, length=batching.padded_length(tok, rows, buckets))
    out = jax.device_get(step(params, batch))
    for r, i in enumerate(rows):
      if i >= 0:
        results[keep[i]] = _record(
          task_cfg.kind, out, batch, r, labels, words[i] if task_cfg.kind == "tagging" else None
        )
  with open(output_path, "w") as f:
    for i, (number, text, problem) in enumerate(lines):
      record = {"line": number, "text": text}
      if problem:
        record["warning"] = problem
      record.update(results.get(i, {"error": "empty line"}))
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return output_path


def _record(kind, out, batch, r, labels, words) -> dict:
  if kind == "tagging":
    starts = batch["labels"][r] != tagging.IGNORE  # First sub-token of each (kept) word.
    tags = [labels[t] for t in out["label"][r][starts]]
    spans = [
      {"type": t, "start": a, "end": b + 1, "text": " ".join(words[a : b + 1])}
      for t, a, b in tagging.entities(tags)
    ]
    return {"tags": tags, "spans": spans, "words": len(words), "tagged": len(tags)}
  if kind == "regression":
    return {"value": float(out["value"][r])}
  probs = out["prob"][r]
  return {
    "label": labels[int(out["label"][r])],
    "probs": {name: round(float(p), 6) for name, p in zip(labels, probs)},
  }
